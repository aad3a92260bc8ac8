"""Detectors whose outputs come after a selection: the cases where an end-to-end comparison
alone cannot prove a fusion (near-tied scores swap rows by rounding).

- QuerySelectionDetector: RT-DETR-style. A RepConv backbone (ultralytics/RT-DETR RepC3 use
  RepConv: 3x3-BN + 1x1-BN), tokens, a class head, TopK over the queries, the selected tokens
  gathered and decoded into boxes. Outputs: the top scores and their boxes.
- OneToOneHead: YOLOv10-style end-to-end head. RepVGGDW blocks (7x7 + 3x3 depthwise conv-BN),
  a conv head of box and class maps, the best class per anchor (ArgMax), TopK of the anchors,
  and boxes, scores and labels gathered.

Score logits are scaled up so many sigmoid scores sit within a few float32 steps of 1: the
near ties real detectors have, which make TopK's order depend on rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tests.reference.families import ConvBN, LargeSmallDw, UltralyticsRepConv


class QuerySelectionDetector(nn.Module):
    def __init__(self, c=8, classes=6, queries=20):
        super().__init__()
        self.stem = ConvBN(3, c, 3, stride=2)
        self.blocks = nn.Sequential(UltralyticsRepConv(c), UltralyticsRepConv(c))
        self.score = nn.Linear(c, classes)
        self.box = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 4))
        self.queries = queries
        with torch.no_grad():
            self.score.weight.mul_(40.0)  # saturated scores: near ties

    def forward(self, x):
        feats = self.blocks(torch.relu(self.stem(x)))
        tokens = feats.flatten(2).transpose(1, 2)                      # [B, HW, C]
        logits = self.score(tokens)                                     # [B, HW, classes]
        best = logits.sigmoid().max(-1).values                          # [B, HW]
        scores, index = best.topk(self.queries, dim=1)                  # TopK over queries
        picked = torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return scores, self.box(picked).sigmoid()

    def deploy(self):
        net = QuerySelectionDetector.__new__(QuerySelectionDetector)
        nn.Module.__init__(net)
        net.stem = self.stem.deploy()
        net.blocks = nn.Sequential(*[b.deploy() for b in self.blocks])
        net.score, net.box, net.queries = self.score, self.box, self.queries
        return net.eval()


class OneToOneHead(nn.Module):
    def __init__(self, c=8, classes=5, k=12):
        super().__init__()
        self.stem = ConvBN(3, c, 3, stride=2)
        self.blocks = nn.Sequential(LargeSmallDw(c, 7, 3, act=True), LargeSmallDw(c, 7, 3, act=True))
        self.box = nn.Conv2d(c, 4, 1)
        self.cls = nn.Conv2d(c, classes, 1)
        self.k = k
        with torch.no_grad():
            self.cls.weight.mul_(40.0)

    def features(self, x):
        return self.blocks(torch.relu(self.stem(x)))

    def forward(self, x):
        feats = self.features(x)
        boxes = self.box(feats).flatten(2).transpose(1, 2)              # [B, A, 4]
        logits = self.cls(feats).flatten(2).transpose(1, 2)             # [B, A, classes]
        best, labels = logits.sigmoid().max(-1)                         # ArgMax per anchor
        scores, index = best.topk(self.k, dim=1)
        picked = torch.gather(boxes, 1, index.unsqueeze(-1).expand(-1, -1, 4))
        picked_labels = torch.gather(labels, 1, index)
        return torch.cat([picked, scores.unsqueeze(-1), picked_labels.unsqueeze(-1).float()], -1)

    def deploy(self):
        net = OneToOneHead.__new__(OneToOneHead)
        nn.Module.__init__(net)
        net.stem = self.stem.deploy()
        net.blocks = nn.Sequential(*[b.deploy() for b in self.blocks])
        net.box, net.cls, net.k = self.box, self.cls, self.k
        return net.eval()
