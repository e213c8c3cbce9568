"""Weighted k-nearest-neighbour classification of frozen features (DINO's kNN protocol).

Features are l2-normalized; each test image takes its k most similar training images
(cosine similarity s), which vote for their class with weight exp(s / T) (k = 20,
T = 0.07 in DINO). The prediction is the class with the largest total vote.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def extract_features(encode, dataset: Dataset, transform, device: torch.device, batch_size: int = 256):
    """(features (N, C) float32 l2-normalized, labels (N,)) of ``dataset`` through ``encode``."""
    def collate(samples):
        images, labels = zip(*samples)
        return torch.stack([transform(image) for image in images]), torch.tensor(labels)

    features, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        features.append(F.normalize(encode(images.to(device)).float(), dim=1).cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def weighted_knn_predict(train_features, train_labels, test_features, n_classes: int, k: int = 20,
                         temperature: float = 0.07, chunk: int = 512) -> torch.Tensor:
    """Predicted labels of ``test_features`` by exp(similarity / temperature)-weighted votes."""
    k = min(k, train_features.shape[0])
    predictions = []
    for start in range(0, test_features.shape[0], chunk):
        similarity = test_features[start:start + chunk] @ train_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(similarity.shape[0], n_classes)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


@torch.no_grad()
def knn_accuracy(backbone: nn.Module, train_set: Dataset, test_set: Dataset, transform, device: torch.device,
                 n_classes: int, k: int = 20, temperature: float = 0.07, pooling: str = "cls") -> float:
    """Top-1 accuracy (%) of weighted kNN on ``backbone.features(images, pooling)`` (eval mode,
    restored after)."""
    was_training = backbone.training
    backbone.eval()

    def encode(images):
        return backbone.features(images, pooling)

    try:
        train_features, train_labels = extract_features(encode, train_set, transform, device)
        test_features, test_labels = extract_features(encode, test_set, transform, device)
    finally:
        backbone.train(was_training)
    predicted = weighted_knn_predict(train_features, train_labels, test_features, n_classes, k, temperature)
    return 100.0 * (predicted == test_labels).float().mean().item()
