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
    coredns                = {}
    kube-proxy             = {}
    vpc-cni                = { before_compute = true }
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
    }

    cpu = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.cpu_instance_types
      capacity_type  = local.worker_capacity_type
      min_size       = 0
      max_size       = var.cpu_max_nodes
      desired_size   = 0
      labels         = { "t2id.io/pool" = "cpu" }
    }

    gpu = {
      ami_type       = "AL2023_x86_64_NVIDIA"
      instance_types = var.gpu_instance_types
      capacity_type  = local.worker_capacity_type
      min_size       = 0
      max_size       = var.gpu_max_nodes
      desired_size   = 0
      labels         = { "t2id.io/pool" = "gpu" }

      taints = {
        gpu = {
          key    = "nvidia.com/gpu"
          value  = "true"
          effect = "NO_SCHEDULE"
        }
      }

      block_device_mappings = {
        xvda = {
          device_name = "/dev/xvda"

          ebs = {
            volume_size = 200 # CUDA image + model weights
            volume_type = "gp3"
            encrypted   = true
          }
        }
      }
    }
  }
}
