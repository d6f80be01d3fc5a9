"""Kubernetes helpers: ``rlhf k8s submit`` (trainer Jobs rendered from the Helm chart) and the ``helm test`` smoke check."""
