#!/bin/sh
# Container entrypoint. `docker run IMAGE pipeline --smoke-test` or `docker run IMAGE lora --config F`
# runs a job module (python -m jobs.<name>); anything else runs as given. KubeRay replaces the
# entrypoint with its own `ray start` command, so Ray pods never come through here.
set -eu
case "${1:-}" in
  pipeline|data|split|lora|generate|label|evaluate|grid|report)
    job="$1"
    shift
    exec python -m "jobs.${job}" "$@"
    ;;
esac
exec "$@"
