# Identity of the Ray pods: EKS Pod Identity binds this role to the ServiceAccount t2id/t2id-ray
# (k8s/namespace/serviceaccount.yaml). The role can read and write only s3://BUCKET/<run_prefix>/ and
# read only the listed input prefixes; no access keys exist anywhere.

data "aws_iam_policy_document" "ray_trust" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]

    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray" {
  name               = "${var.name}-ray-pods"
  description        = "Ray pods of t2id: the run store prefix of the bucket"
  assume_role_policy = data.aws_iam_policy_document.ray_trust.json
}

data "aws_iam_policy_document" "ray_store" {
  # ListBucket without an s3:prefix condition: HeadBucket (which pyarrow's S3FileSystem, and so
  # Ray Train/Tune's create_dir, sends as `HEAD /<bucket>`) is authorised by s3:ListBucket but
  # carries no prefix, so a prefix condition denies it and lora/grid fail with ACCESS_DENIED. The
  # cost: the role may list key names of this bucket (its own runs, datasets, models); object
  # reads and writes stay limited to the prefixes below.
  statement {
    sid       = "ListTheStoreBucket"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.store.arn]
  }

  statement {
    sid       = "ReadWriteRuns"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = ["${aws_s3_bucket.store.arn}/${var.run_prefix}/*"]
  }

  statement {
    sid       = "ReadInputs"
    actions   = ["s3:GetObject"]
    resources = [for p in var.read_prefixes : "${aws_s3_bucket.store.arn}/${p}/*"]
  }

  statement {
    sid       = "UseTheStoreKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.store.arn]
  }
}

resource "aws_iam_role_policy" "ray_store" {
  name   = "run-store"
  role   = aws_iam_role.ray.id
  policy = data.aws_iam_policy_document.ray_store.json
}

resource "aws_eks_pod_identity_association" "ray" {
  cluster_name    = module.eks.cluster_name
  namespace       = var.namespace
  service_account = var.service_account
  role_arn        = aws_iam_role.ray.arn
}

# cluster-autoscaler: scales the managed node groups (from zero for cpu/gpu).
module "cluster_autoscaler_pod_identity" {
  # checkov:skip=CKV_TF_1:Terraform Registry module pinned by a version constraint (terraform init records its checksums in .terraform.lock.hcl); commit hashes apply to git sources.
  source  = "terraform-aws-modules/eks-pod-identity/aws"
  version = "~> 2.0"

  name = "${var.name}-cluster-autoscaler"

  attach_cluster_autoscaler_policy = true
  cluster_autoscaler_cluster_names = [module.eks.cluster_name]

  associations = {
    this = {
      cluster_name    = module.eks.cluster_name
      namespace       = "kube-system"
      service_account = "cluster-autoscaler"
    }
  }
}
