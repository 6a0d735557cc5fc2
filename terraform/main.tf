# Network and cluster: a VPC with private subnets for the nodes, an EKS cluster, and three managed
# node groups: on-demand "ray-head" (Ray heads, operators, system pods), "cpu" and "gpu" workers
# that scale from zero (cluster-autoscaler, helm.tf). Node labels t2id.io/pool match the
# nodeSelectors of the RayJob (t2id/cluster_config.py); GPU nodes carry the nvidia.com/gpu taint
# that only the GPU worker group tolerates.

data "aws_availability_zones" "available" {
  # checkov:skip=CKV_AWS_394:Only the first three zone names are used (slice below); a zone AWS adds later sorts after them, so the subnets never move.
  state = "available"
}

data "aws_caller_identity" "current" {}

locals {
  azs                  = slice(data.aws_availability_zones.available.names, 0, 3)
  bucket_name          = var.bucket_name != "" ? var.bucket_name : "${var.name}-runs-${data.aws_caller_identity.current.account_id}"
  worker_capacity_type = var.gpu_spot ? "SPOT" : "ON_DEMAND"

  # cluster-autoscaler release of the cluster's Kubernetes minor (helm.tf)
  cluster_autoscaler_tag = "v${var.kubernetes_version}.0"

  # Root volume of every node: the 20 GiB default cannot hold a t2id image (the venv alone is
  # 6.2 GB in the CPU image the head and CPU workers pull, 7.3 GB in the GPU image; pulled
  # compressed and unpacked) plus kubelet's image GC headroom.
  root_volume = {
    xvda = {
      device_name = "/dev/xvda"

      ebs = {
        volume_size = var.node_disk_gib
        volume_type = "gp3"
        encrypted   = true
      }
    }
  }
}

module "vpc" {
  # checkov:skip=CKV_TF_1:Terraform Registry module pinned by a version constraint (terraform init records its checksums in .terraform.lock.hcl); commit hashes apply to git sources.
  source  = "terraform-aws-modules/vpc/aws"
  version = "~> 6.0"

  name = var.name
  cidr = var.vpc_cidr
  azs  = local.azs

  private_subnets = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 4, i)]
  public_subnets  = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 8, 48 + i)]

  enable_nat_gateway = true
  single_nat_gateway = true

  enable_flow_log                      = true
  create_flow_log_cloudwatch_iam_role  = true
  create_flow_log_cloudwatch_log_group = true

  private_subnet_tags = { "kubernetes.io/role/internal-elb" = 1 }
  public_subnet_tags  = { "kubernetes.io/role/elb" = 1 }
}

module "eks" {
  # checkov:skip=CKV_TF_1:Terraform Registry module pinned by a version constraint (terraform init records its checksums in .terraform.lock.hcl); commit hashes apply to git sources.
  source  = "terraform-aws-modules/eks/aws"
  version = "~> 21.0"

  name               = var.name
  kubernetes_version = var.kubernetes_version

  vpc_id     = module.vpc.vpc_id
  subnet_ids = module.vpc.private_subnets

  endpoint_public_access       = length(var.cluster_endpoint_public_access_cidrs) > 0
  endpoint_public_access_cidrs = var.cluster_endpoint_public_access_cidrs

  enable_cluster_creator_admin_permissions = true

  addons = {
    # On the always-on head group: a CoreDNS replica on a CPU/GPU node would keep
    # cluster-autoscaler from ever scaling that node group back to zero.
    coredns = {
      configuration_values = jsonencode({ nodeSelector = { "t2id.io/pool" = "ray-head" } })
    }
    kube-proxy = {}
    # enableNetworkPolicy: without it the VPC CNI ignores NetworkPolicy objects, and the policy
    # keeping the Ray dashboard/client ports inside the namespace (k8s/namespace) does nothing.
    vpc-cni = {
      before_compute       = true
      configuration_values = jsonencode({ enableNetworkPolicy = "true" })
    }
    eks-pod-identity-agent = { before_compute = true }
  }

  eks_managed_node_groups = {
    ray-head = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.head_instance_types
      capacity_type  = "ON_DEMAND" # a reclaimed head ends the whole Ray job
      min_size       = 1
      max_size       = 3
      desired_size   = 1
      labels         = { "t2id.io/pool" = "ray-head" }

      block_device_mappings = local.root_volume
    }

    cpu = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.cpu_instance_types
      capacity_type  = local.worker_capacity_type
      min_size       = 0
      max_size       = var.cpu_max_nodes
      desired_size   = 0
      labels         = { "t2id.io/pool" = "cpu" }

      block_device_mappings = local.root_volume
    }

    gpu = {
      ami_type       = "AL2023_x86_64_NVIDIA"
      instance_types = var.gpu_instance_types
      capacity_type  = local.worker_capacity_type
      min_size       = 0
      max_size       = var.gpu_max_nodes
      desired_size   = 0
      # k8s.amazonaws.com/accelerator: cluster-autoscaler's GPU label on AWS; with it a new GPU node
      # counts as not ready until the device plugin advertises nvidia.com/gpu, instead of as a node
      # that cannot fit the pending pod (which would make the autoscaler add more nodes).
      labels = { "t2id.io/pool" = "gpu", "k8s.amazonaws.com/accelerator" = "nvidia" }

      taints = {
        gpu = {
          key    = "nvidia.com/gpu"
          value  = "true"
          effect = "NO_SCHEDULE"
        }
      }

      # the image plus SDXL weights and caches in the pods' emptyDirs
      block_device_mappings = {
        xvda = {
          device_name = "/dev/xvda"

          ebs = {
            volume_size = var.gpu_node_disk_gib
            volume_type = "gp3"
            encrypted   = true
          }
        }
      }
    }
  }
}
