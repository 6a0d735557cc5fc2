# Registry for the t2id images (docker/Dockerfile.gpu, docker/Dockerfile.cpu): immutable tags,
# scanned on push, KMS-encrypted.
resource "aws_ecr_repository" "t2id" {
  name                 = var.name
  image_tag_mutability = "IMMUTABLE"
  force_delete         = true # images are rebuilt from the repository; `terraform destroy` must not stall on them

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.store.arn
  }
}

resource "aws_ecr_lifecycle_policy" "t2id" {
  repository = aws_ecr_repository.t2id.name

  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "keep the 20 newest images"
      selection    = { tagStatus = "any", countType = "imageCountMoreThan", countNumber = 20 }
      action       = { type = "expire" }
    }]
  })
}
