# In-cluster software: the KubeRay operator (CRDs RayJob/RayCluster, v1.7.0 like shared/kuberay),
# cluster-autoscaler (node groups from and to zero), and the NVIDIA device plugin (nvidia.com/gpu).

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  namespace        = "kuberay-system" # k8s/namespace/networkpolicy.yaml lets this namespace reach the dashboard
  create_namespace = true
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_version

  values = [yamlencode({
    nodeSelector = { "t2id.io/pool" = "ray-head" }

    securityContext = {
      allowPrivilegeEscalation = false
      readOnlyRootFilesystem   = true
      runAsNonRoot             = true
      capabilities             = { drop = ["ALL"] }
      seccompProfile           = { type = "RuntimeDefault" }
    }
  })]

  depends_on = [module.eks]
}

resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  namespace  = "kube-system"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.cluster_autoscaler_chart_version

  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = var.region
    autoDiscovery = { clusterName = module.eks.cluster_name }
    rbac          = { serviceAccount = { name = "cluster-autoscaler" } }
    nodeSelector  = { "t2id.io/pool" = "ray-head" }

    # cluster-autoscaler supports the Kubernetes minor it is released with: pin the image to the
    # cluster's minor instead of the chart's default appVersion (one minor behind).
    image = { tag = local.cluster_autoscaler_tag }

    # Idle GPU nodes go away quickly; a RayJob's autoscaler already waited idleTimeoutSeconds.
    extraArgs = {
      "scale-down-unneeded-time"      = "5m"
      "balance-similar-node-groups"   = true
      "skip-nodes-with-local-storage" = false
    }
  })]

  depends_on = [module.cluster_autoscaler_pod_identity]
}

resource "helm_release" "nvidia_device_plugin" {
  name             = "nvidia-device-plugin"
  namespace        = "nvidia-device-plugin"
  create_namespace = true
  repository       = "https://nvidia.github.io/k8s-device-plugin"
  chart            = "nvidia-device-plugin"
  version          = var.nvidia_device_plugin_version

  # The chart's default affinity requires labels that only NFD / GPU feature discovery set
  # (feature.node.kubernetes.io/pci-10de.present, nvidia.com/gpu.present), and neither runs here:
  # the DaemonSet would schedule no pod and no node would advertise nvidia.com/gpu. Replace it
  # (Helm merges maps but replaces lists, so nodeSelectorTerms is ours alone) with the GPU node
  # group's own label.
  values = [yamlencode({
    affinity = {
      nodeAffinity = {
        requiredDuringSchedulingIgnoredDuringExecution = {
          nodeSelectorTerms = [{
            matchExpressions = [{ key = "t2id.io/pool", operator = "In", values = ["gpu"] }]
          }]
        }
      }
    }
    tolerations = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
  })]

  depends_on = [module.eks]
}
