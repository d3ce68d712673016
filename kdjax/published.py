"""Published CIFAR-100 top-1 accuracies (%), for the tables kdjax prints beside its own (kdjax/results.py).

Sources, as they give them: RepDistiller's README (the CRD paper's Tables 1 and 2: every method with RepDistiller's
recipe; 'ce' is the student trained alone, 'teacher' the teacher) and mdistiller's README (DKD). mdistiller's README
heads its last column 'ResNet32x4 MobileNet-V2', but its KD entry (74.45) is RepDistiller's resnet32x4 -> ShuffleV2
and the DKD paper's table names ShuffleNet-V2 there: it is recorded as ShuffleV2. RepDistiller prints FSP on
wrn_40_2 -> wrn_40_1 as 0.00 (not run: the channels differ): left out.
"""

from __future__ import annotations

# (teacher, student) pairs in the sources' column order.
_SAME = (('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('resnet56', 'resnet20'), ('resnet110', 'resnet20'),
         ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8'))
_DIFFERENT = (('vgg13', 'MobileNetV2'), ('ResNet50', 'MobileNetV2'), ('ResNet50', 'vgg8'), ('resnet32x4', 'ShuffleV1'),
              ('resnet32x4', 'ShuffleV2'), ('wrn_40_2', 'ShuffleV1'))

_REPDISTILLER_SAME = {
    'teacher': (75.61, 75.61, 72.34, 74.31, 74.31, 79.42, 74.64),
    'ce': (73.26, 71.98, 69.06, 69.06, 71.14, 72.50, 70.36),
    'kd': (74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98),
    'fitnet': (73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02),
    'at': (74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43),
    'sp': (73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68),
    'cc': (73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71),
    'vid': (74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23),
    'rkd': (73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48),
    'pkt': (74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88),
    'ab': (72.50, 72.38, 69.47, 69.53, 70.98, 73.17, 70.94),
    'ft': (73.25, 71.59, 69.84, 70.22, 72.37, 72.86, 70.58),
    'fsp': (72.91, None, 69.95, 70.11, 71.89, 72.62, 70.23),
    'nst': (73.68, 72.24, 69.60, 69.53, 71.96, 73.30, 71.53),
    'crd': (75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94),
}
_REPDISTILLER_DIFFERENT = {
    'teacher': (74.64, 79.34, 79.34, 79.42, 79.42, 75.61),
    'ce': (64.60, 64.60, 70.36, 70.50, 71.82, 70.50),
    'kd': (67.37, 67.35, 73.81, 74.07, 74.45, 74.83),
    'fitnet': (64.14, 63.16, 70.69, 73.59, 73.54, 73.73),
    'at': (59.40, 58.58, 71.84, 71.73, 72.73, 73.32),
    'sp': (66.30, 68.08, 73.34, 73.48, 74.56, 74.52),
    'cc': (64.86, 65.43, 70.25, 71.14, 71.29, 71.38),
    'vid': (65.56, 67.57, 70.30, 73.38, 73.40, 73.61),
    'rkd': (64.52, 64.43, 71.50, 72.28, 73.21, 72.21),
    'pkt': (67.13, 66.52, 73.01, 74.10, 74.69, 73.89),
    'ab': (66.06, 67.20, 70.65, 73.55, 74.31, 73.34),
    'ft': (61.78, 60.99, 70.29, 71.75, 72.50, 72.03),
    'nst': (58.16, 64.96, 71.28, 74.12, 74.68, 74.89),
    'crd': (69.73, 69.11, 74.30, 75.11, 75.65, 76.05),
}
_MDISTILLER_DKD = {
    ('resnet56', 'resnet20'): 71.97, ('resnet110', 'resnet32'): 74.11, ('resnet32x4', 'resnet8x4'): 76.32,
    ('wrn_40_2', 'wrn_16_2'): 76.23, ('wrn_40_2', 'wrn_40_1'): 74.81, ('vgg13', 'vgg8'): 74.68,
    ('resnet32x4', 'ShuffleV1'): 76.45, ('wrn_40_2', 'ShuffleV1'): 76.70, ('vgg13', 'MobileNetV2'): 69.71,
    ('ResNet50', 'MobileNetV2'): 70.35, ('resnet32x4', 'ShuffleV2'): 77.07,
}


def _build() -> dict:
  table = {}
  for pairs, rows in ((_SAME, _REPDISTILLER_SAME), (_DIFFERENT, _REPDISTILLER_DIFFERENT)):
    for method, values in rows.items():
      for pair, value in zip(pairs, values):
        if value is not None:
          table[(method, *pair)] = value
  for pair, value in _MDISTILLER_DKD.items():
    table[('dkd', *pair)] = value
  return table


CIFAR100 = _build()


def cifar100(method: str, teacher: str, student: str) -> float | None:
  """The published top-1 (%) of `method` ('ce': the student alone, 'teacher') for the pair, or None."""
  return CIFAR100.get((method, teacher, student))


# DeiT (facebookresearch/deit README, ImageNet top-1 % at 224 px): {student: (trained alone, with DeiT's hard
# distillation through the distillation token)}; configs/deit.py:tiny / :small.
DEIT_IMAGENET = {'deit_tiny': (72.2, 74.5), 'deit_small': (79.9, 81.2)}
# CIFAR-100 ViT student (logit-standardization-KD tiny-transformers/README.md, Locality Guidance's repository):
# DeiT-Tiny trained alone, with the ResNet-56's Locality Guidance (feature maps; the paper's ECCV 2022 column) and
# with KD + logit standardization; configs/deit.py:cifar100 is the logit recipe.
DEIT_CIFAR100 = {'deit_tiny': {'ce': 65.08, 'locality_guidance': 78.15, 'kd_ls': 78.55}}
