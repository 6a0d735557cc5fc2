# The run store: versioned, KMS-encrypted, never public, TLS only. Lifecycle rules expire old
# object versions and abort multipart uploads that never completed (a killed stage can leave them;
# t2id's writes are single PUTs or completed multipart uploads, so nothing live is lost).

resource "aws_kms_key" "store" {
  description             = "${var.name}: encryption of the run store bucket"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "store" {
  name          = "alias/${var.name}-store"
  target_key_id = aws_kms_key.store.key_id
}

data "aws_iam_policy_document" "kms" {
  # checkov:skip=CKV_AWS_111:A key policy's "*" resource is the key itself; administration stays with the account root (AWS default key policy).
  # checkov:skip=CKV_AWS_356:A key policy's "*" resource is the key itself, not every resource.
  # checkov:skip=CKV_AWS_109:A key policy's "*" resource is the key itself; without an admin statement the key becomes unmanageable.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy, "*" means this key

    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
}

resource "aws_s3_bucket" "store" {
  # checkov:skip=CKV_AWS_18:Access logging needs a second bucket that itself cannot log; this module creates no audit trail, so turn on CloudTrail S3 data events for the account if you need one.
  # checkov:skip=CKV_AWS_144:Cross-region replication doubles storage for reproducible, re-runnable outputs; enable it if your data needs it.
  # checkov:skip=CKV2_AWS_62:No consumer of object events: stages poll markers (_SUCCESS.json).
  bucket = local.bucket_name

  # false: `terraform destroy` refuses to delete a bucket that still holds runs (it is versioned).
  # To tear everything down: apply with -var force_destroy_bucket=true, then destroy.
  force_destroy = var.force_destroy_bucket
}

resource "aws_s3_bucket_public_access_block" "store" {
  bucket                  = aws_s3_bucket.store.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "store" {
  bucket = aws_s3_bucket.store.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "store" {
  bucket = aws_s3_bucket.store.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "store" {
  bucket = aws_s3_bucket.store.id

  rule {
    bucket_key_enabled = true

    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.store.arn
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "store" {
  bucket = aws_s3_bucket.store.id

  rule {
    id     = "abort-incomplete-multipart"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 3
    }
  }

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
  }
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.store.arn, "${aws_s3_bucket.store.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "store" {
  bucket = aws_s3_bucket.store.id
  policy = data.aws_iam_policy_document.bucket.json

  depends_on = [aws_s3_bucket_public_access_block.store]
}
