"""The run layout: the only module that spells a store key.

Every key is relative to the run root `<store>/<run_id>/` (DESIGN.md, "Store"). Stages, Ray
workers, the report and the tests ask this module for keys (`layout.lora.adapter(fold)`,
`layout.generate.manifest(fold)`, ...), so a key is written down exactly once and a reader can
never disagree with its writer.
"""

from __future__ import annotations

import re

MARKER = "_SUCCESS.json"
CONFIG = "config.yaml"
MEMO = "_memo.json"  # a unit of work's memo (t2id.resume), beside the unit's outputs
RUN_LOCK = "_lock.json"  # the run lock (t2id.runlock): who is running this run id, and which stage


def marker(stage: str) -> str:
    """`<stage>/_SUCCESS.json`: written last by the runner when a stage is done."""
    return f"{stage}/{MARKER}"


FAILED = "_FAILED.json"


def failed(stage: str) -> str:
    """`<stage>/_FAILED.json`: {error, at}, written by the runner when a stage raised; deleted when it succeeds."""
    return f"{stage}/{FAILED}"


def stage_log(stage: str) -> str:
    """`<stage>/logs/<stage>.log`: what the process printed while the stage ran (quiet console; t2id.console)."""
    return f"{stage}/logs/{stage}.log"


def slug(name: str) -> str:
    """'tracheal ring' -> 'tracheal-ring': a folder-safe, stable name for a class."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not text:
        raise ValueError(f"class name {name!r} has no letters or digits to name a folder after")
    return text


def memo(prefix: str) -> str:
    """The memo of the unit of work whose outputs live under `prefix`."""
    return f"{prefix}/{MEMO}"


MLRUNS = "mlruns"  # the default MLflow file store of a run in a local store (t2id.tracking)


def tensorboard(stage: str, unit: str) -> str:
    """`<stage>/logs/tensorboard/<unit>/`: TensorBoard event files of one unit of work (t2id.tracking)."""
    return f"{stage}/logs/tensorboard/{unit}"


class _Data:
    root = "data"
    manifest = "data/manifest.parquet"
    quarantine = "data/quarantine.parquet"
    classes = "data/classes.json"
    stats = "data/stats.parquet"
    class_distribution = "data/class_distribution.png"
    sources = "data/sources.parquet"
    images = "data/images"

    def image(self, image_id: str, suffix: str) -> str:
        return f"{self.images}/{image_id}{suffix}"


class _Split:
    root = "split"
    folds = "split/folds.parquet"
    fold_classes = "split/fold_classes.parquet"


class _Lora:
    root = "lora"
    adapter_file = "pytorch_lora_weights.safetensors"  # diffusers' name: pipe.load_lora_weights(dir)
    ray_storage = "lora/_ray"  # Ray Train checkpoints

    def fold(self, fold: int) -> str:
        return f"lora/fold={fold}"

    def adapter(self, fold: int) -> str:
        return f"{self.fold(fold)}/{self.adapter_file}"

    def train_ids(self, fold: int) -> str:
        return f"{self.fold(fold)}/train_ids.json"

    def train_log(self, fold: int) -> str:
        return f"{self.fold(fold)}/train_log.parquet"

    def ranks(self, fold: int) -> str:
        return f"{self.fold(fold)}/ranks"

    def rank(self, fold: int, rank: int) -> str:
        return f"{self.ranks(fold)}/rank={rank}.json"

    def latent_shard(self, fold: int, cache_key: str, rank: int, world: int) -> str:
        """One rank's share of the fold's frozen encodings (t2id.lora.data.load_or_build_shared_cache)."""
        return f"{self.fold(fold)}/latents/{cache_key}/rank={rank}-of-{world}.pt"

    def validation_epoch(self, fold: int, epoch: int) -> str:
        return f"{self.fold(fold)}/validation/epoch={epoch:04d}"

    def validation(self, fold: int, epoch: int, class_name: str, index: int) -> str:
        return f"{self.validation_epoch(fold, epoch)}/{slug(class_name)}-{index}.png"

    def embeddings(self, fold: int) -> str:
        """lora.method textual_inversion: the learnt token embeddings, diffusers' SDXL format (keys clip_l for
        text_encoder, clip_g for text_encoder_2; rows = the tokens of tokens.json, in order)."""
        return f"{self.fold(fold)}/learned_embeds.safetensors"

    def tokens(self, fold: int) -> str:
        """lora.method textual_inversion: {"tokens": {class: [token, token_1, ...]}} of the embeddings' rows."""
        return f"{self.fold(fold)}/tokens.json"

    def prior(self, fold: int) -> str:
        """lora.method dreambooth_lora: the class-prior images drawn by the base model, laid out like generate's
        (images/, records/, plan.parquet)."""
        return f"{self.fold(fold)}/prior"

    def prior_plan(self, fold: int) -> str:
        return f"{self.prior(fold)}/plan.parquet"

    def prior_images(self, fold: int) -> str:
        return f"{self.prior(fold)}/images"

    def prior_records(self, fold: int) -> str:
        return f"{self.prior(fold)}/records"

    def prior_image(self, fold: int, class_name: str, name: str) -> str:
        return f"{self.prior_images(fold)}/{slug(class_name)}/{name}.png"

    def prior_record(self, fold: int, class_name: str, name: str) -> str:
        return f"{self.prior_records(fold)}/{slug(class_name)}/{name}.json"

    def ray_run(self, run_name: str) -> str:
        """Ray Train's folder of one training run (its checkpoints and checkpoint-manager snapshot)."""
        return f"{self.ray_storage}/{run_name}"

    ddpm_weights_file = "diffusion_pytorch_model.safetensors"  # diffusers' names: UNet2DModel.from_pretrained(dir)
    ddpm_files = ("config.json", ddpm_weights_file, "scheduler_config.json")  # + DDPMScheduler.from_pretrained(dir)

    def ddpm(self, fold: int) -> str:
        """lora.method ddpm: the fold's unconditional DDPMs, one folder per target class."""
        return f"{self.fold(fold)}/ddpm"

    def ddpm_models(self, fold: int) -> str:
        """lora.method ddpm: {"classes": {class: {dir, weights_sha256, seed, image_ids}}}, written last: the
        fold's generator (generate's lora_sha256 of a row is its class's weights_sha256)."""
        return f"{self.ddpm(fold)}/models.json"

    def ddpm_class(self, fold: int, class_name: str) -> str:
        """A class's UNet2DModel + DDPMScheduler in diffusers' layout (ddpm_files) and its train_log.parquet."""
        return f"{self.ddpm(fold)}/{slug(class_name)}"

    def ddpm_file(self, fold: int, class_name: str, name: str) -> str:
        return f"{self.ddpm_class(fold, class_name)}/{name}"

    def ddpm_rank(self, fold: int, class_name: str, rank: int) -> str:
        """One DDP rank's record of a class's training (under ranks/, which the stage does not publish)."""
        return f"{self.ranks(fold)}/{slug(class_name)}/rank={rank}.json"


class _Generate:
    root = "generate"

    def fold(self, fold: int) -> str:
        return f"generate/fold={fold}"

    def plan(self, fold: int) -> str:
        return f"{self.fold(fold)}/plan.parquet"

    def manifest(self, fold: int) -> str:
        return f"{self.fold(fold)}/manifest.parquet"

    def images(self, fold: int) -> str:
        return f"{self.fold(fold)}/images"

    def records(self, fold: int) -> str:
        return f"{self.fold(fold)}/records"

    def image(self, fold: int, class_name: str, name: str) -> str:
        return f"{self.images(fold)}/{slug(class_name)}/{name}.png"

    def record(self, fold: int, class_name: str, name: str) -> str:
        return f"{self.records(fold)}/{slug(class_name)}/{name}.json"

    def contact_sheet(self, fold: int, class_name: str) -> str:
        return f"{self.fold(fold)}/contact_sheets/{slug(class_name)}.png"


class _Label:
    root = "label"
    memorization_hist = "label/memorization_hist.png"

    def fold(self, fold: int) -> str:
        return f"label/fold={fold}"

    def labels(self, fold: int) -> str:
        return f"{self.fold(fold)}/labels.parquet"

    def teacher(self, fold: int) -> str:
        return f"{self.fold(fold)}/teacher"

    def teacher_weights(self, fold: int) -> str:
        return f"{self.teacher(fold)}/best.pt"

    def layout_fidelity(self, fold: int) -> str:
        """lora.method layout_lora: per class, requested boxes and those the real-data teacher found (IoU >= 0.5)."""
        return f"{self.fold(fold)}/layout_fidelity.json"

    def inpaint(self, fold: int, method: str = "inpaint") -> str:
        """Inpainted images and records live here, laid out like generate's (images/, records/); `method` is
        label.method (inpaint | inpaint_outpaint), so each method's images have their own folder."""
        return f"{self.fold(fold)}/{method}"

    def inpaint_images(self, fold: int, method: str = "inpaint") -> str:
        return f"{self.inpaint(fold, method)}/images"

    def inpaint_records(self, fold: int, method: str = "inpaint") -> str:
        return f"{self.inpaint(fold, method)}/records"

    def inpaint_image(self, fold: int, class_name: str, name: str, method: str = "inpaint") -> str:
        return f"{self.inpaint_images(fold, method)}/{slug(class_name)}/{name}.png"

    def inpaint_record(self, fold: int, class_name: str, name: str, method: str = "inpaint") -> str:
        return f"{self.inpaint_records(fold, method)}/{slug(class_name)}/{name}.json"

    def topup(self, fold: int) -> str:
        """The teacher's top-up images (text-to-image after label's rejections), laid out like generate's."""
        return f"{self.fold(fold)}/topup"

    def topup_images(self, fold: int) -> str:
        return f"{self.topup(fold)}/images"

    def topup_records(self, fold: int) -> str:
        return f"{self.topup(fold)}/records"

    def topup_image(self, fold: int, class_name: str, name: str) -> str:
        return f"{self.topup_images(fold)}/{slug(class_name)}/{name}.png"

    def topup_record(self, fold: int, class_name: str, name: str) -> str:
        return f"{self.topup_records(fold)}/{slug(class_name)}/{name}.json"


class _Evaluate:
    root = "evaluate"
    metrics = "evaluate/metrics.parquet"
    table1_csv = "evaluate/table1.csv"
    table1_md = "evaluate/table1.md"

    def cache(self, fold: int, kind: str) -> str:
        """A fold's feature cache unit: kind 'real' (InceptionV3) or 'synthetic' (InceptionV3 + CLIP)."""
        return f"evaluate/cache/fold={fold}/{kind}"

    def features(self, fold: int, kind: str) -> str:
        return f"{self.cache(fold, kind)}/features.parquet"

    @staticmethod
    def model(kind: str, name: str) -> str:
        """Where `t2id models cache --upload` puts weights: relative to the STORE root, shared by runs."""
        return f"models/{kind}/{name}"


class _Grid:
    root = "grid"
    trials = "grid/trials.parquet"
    pr_curves = "grid/pr_curves.parquet"
    tune_name = "tune"
    tune = f"grid/{tune_name}"  # Ray Tune's experiment folder

    def trial(self, fold: int, strategy: str, seed: int) -> str:
        """A (fold, strategy, seed) trial's folder; its memo (t2id.resume) sits here too."""
        return f"grid/fold={fold}/strategy={strategy}/seed={seed}"

    def result(self, fold: int, strategy: str, seed: int) -> str:
        """The trial's published output (metrics, PR curves, counts) that the grid's tables are built from."""
        return f"{self.trial(fold, strategy, seed)}/result.json"

    def predictions(self, fold: int, strategy: str, seed: int) -> str:
        """Per-image ground truth and final-model predictions on the fold's validation images."""
        return f"{self.trial(fold, strategy, seed)}/predictions.parquet"

    def weights(self, fold: int, strategy: str, seed: int | None = None) -> str:
        """The trial's final weights (last epoch). Without `seed`: the (fold, strategy) copy of the grid's
        first seed, which `label.teacher.source: grid` reads."""
        if seed is None:
            return f"grid/fold={fold}/strategy={strategy}/final.pt"
        return f"{self.trial(fold, strategy, seed)}/final.pt"

    def trial_metrics(self, fold: int, strategy: str, seed: int) -> str:
        return f"{self.trial(fold, strategy, seed)}/metrics.json"

    @staticmethod
    def trial_name(fold: int, strategy: str, seed: int) -> str:
        """A trial's name in Ray Tune, and its folder in Tune's experiment."""
        return f"fold={fold}-{strategy}-seed={seed}"

    def tune_trial_result(self, name: str) -> str:
        """Tune's own record of what a trial reported."""
        return f"{self.tune}/{name}/result.json"


class _Report:
    root = "report"
    index_html = "report/index.html"
    report_md = "report/report.md"

    def figure(self, name: str) -> str:
        return f"report/figures/{name}"

    def table(self, name: str) -> str:
        return f"report/tables/{name}"


data = _Data()
split = _Split()
lora = _Lora()
generate = _Generate()
label = _Label()
evaluate = _Evaluate()
grid = _Grid()
report = _Report()
