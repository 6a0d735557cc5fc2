output "cluster_name" {
  description = "EKS cluster name: aws eks update-kubeconfig --name <this> --region <region>."
  value       = module.eks.cluster_name
}

output "kubeconfig_command" {
  description = "Command that points kubectl (and t2id submit --k8s) at the cluster."
  value       = "aws eks update-kubeconfig --name ${module.eks.cluster_name} --region ${var.region}"
}

output "bucket_name" {
  description = "Run store bucket; set store.uri to s3://<this>/<run_prefix> in the config."
  value       = aws_s3_bucket.store.bucket
}

output "store_uri" {
  description = "The store.uri the Ray pods may write to."
  value       = "s3://${aws_s3_bucket.store.bucket}/${var.run_prefix}"
}

output "ecr_repository_url" {
  description = "Push the t2id images here (k8s/overlays/aws images.newName)."
  value       = aws_ecr_repository.t2id.repository_url
}

output "ray_pod_role_arn" {
  description = "IAM role the Ray pods get through EKS Pod Identity (namespace/service account of the variables)."
  value       = aws_iam_role.ray.arn
}

output "region" {
  description = "AWS region of everything above."
  value       = var.region
}
