variable "region" {
  description = "AWS region for every resource."
  type        = string
  default     = "us-east-1"
}

variable "name" {
  description = "Name prefix of the cluster, VPC, bucket and roles."
  type        = string
  default     = "t2id"
}

variable "tags" {
  description = "Tags added to every AWS resource."
  type        = map(string)
  default     = { project = "t2id" }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.33"
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC; split into three private and three public subnets."
  type        = string
  default     = "10.40.0.0/16"
}

variable "cluster_endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the public EKS API endpoint (your office / VPN). Empty list: private endpoint only."
  type        = list(string)
  default     = []
}

variable "head_instance_types" {
  description = "Instance types of the on-demand node group that runs Ray heads, the KubeRay operator and system pods."
  type        = list(string)
  default     = ["m6i.xlarge"]
}

variable "cpu_instance_types" {
  description = "Instance types of the CPU worker node group (data, split, labelling, report)."
  type        = list(string)
  default     = ["m6i.2xlarge", "m6a.2xlarge"]
}

variable "cpu_max_nodes" {
  description = "Most CPU worker nodes; the group scales to zero when idle."
  type        = number
  default     = 4
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU worker node group (LoRA, generation, detector grid); one GPU each by default."
  type        = list(string)
  default     = ["g5.2xlarge", "g6.2xlarge"]
}

variable "gpu_max_nodes" {
  description = "Most GPU nodes; the group scales to zero when no GPU pod waits."
  type        = number
  default     = 4
}

variable "gpu_spot" {
  description = "Run GPU (and CPU worker) nodes on spot capacity. Stages resume from their markers after a reclaim; heads stay on-demand."
  type        = bool
  default     = true
}

variable "bucket_name" {
  description = "S3 bucket for runs, datasets and model weights (globally unique). Empty: <name>-runs-<account id>."
  type        = string
  default     = ""
}

variable "run_prefix" {
  description = "Key prefix in the bucket that the Ray pods may read and write (store.uri = s3://BUCKET/<run_prefix>)."
  type        = string
  default     = "runs"
}

variable "read_prefixes" {
  description = "Further key prefixes the Ray pods may only read (datasets, base model weights)."
  type        = list(string)
  default     = ["datasets", "models"]
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept before expiry."
  type        = number
  default     = 30
}

variable "namespace" {
  description = "Kubernetes namespace of the RayJobs (k8s/base: t2id)."
  type        = string
  default     = "t2id"
}

variable "service_account" {
  description = "ServiceAccount of the Ray pods that gets the bucket role (k8s/base: t2id-ray)."
  type        = string
  default     = "t2id-ray"
}

variable "kuberay_version" {
  description = "KubeRay operator Helm chart version; its CRDs must match the ones manifests are validated against."
  type        = string
  default     = "1.7.0"
}

variable "node_disk_gib" {
  description = "Root volume (GiB) of the head and CPU worker nodes: holds the pulled t2id CPU image (docker/Dockerfile.cpu) and pod emptyDirs."
  type        = number
  default     = 100
}

variable "gpu_node_disk_gib" {
  description = "Root volume (GiB) of the GPU nodes: the GPU image (docker/Dockerfile.gpu), SDXL weights and caches in pod emptyDirs."
  type        = number
  default     = 200
}

variable "force_destroy_bucket" {
  description = "Let `terraform destroy` delete the run-store bucket with every run and object version in it. Apply with true before destroying."
  type        = bool
  default     = false
}

variable "cluster_autoscaler_chart_version" {
  description = "cluster-autoscaler Helm chart version (scales the node groups, including from and to zero); its image is pinned to the cluster's Kubernetes minor (main.tf locals)."
  type        = string
  default     = "9.46.6"
}

variable "nvidia_device_plugin_version" {
  description = "NVIDIA device plugin Helm chart version (advertises nvidia.com/gpu on GPU nodes)."
  type        = string
  default     = "0.17.1"
}
