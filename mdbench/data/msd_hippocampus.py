"""Medical Segmentation Decathlon Task04 Hippocampus (Antonelli et al. 2022): 3D MRI, 3 labels.

Layout: ``<folder>/Task04_Hippocampus/dataset.json`` whose ``training`` list names
``./imagesTr/hippocampus_NNN.nii.gz`` / ``./labelsTr/hippocampus_NNN.nii.gz`` pairs, read by the Decathlon loader
(:class:`mdbench.data.decathlon.DecathlonDataset`: RAS+ volumes, a seeded random 70/15/15 split over the pairs).
Shapes vary per case (32-43 x 40-58 x 26-45 voxels of 1 mm); pass ``spatial_size`` to batch them.
"""
from __future__ import annotations

from mdbench.data.decathlon import DecathlonDataset

SUBFOLDER = "Task04_Hippocampus"
CLASSES = ("background", "anterior", "posterior")


class MSDHippocampusDataset(DecathlonDataset):
    """Hippocampus MRI volumes with anterior/posterior labels (items and arguments: :class:`DecathlonDataset`);
    ``folder`` is the ``msd_hippocampus`` folder, which holds ``Task04_Hippocampus``."""

    name = "msd_hippocampus"
    subfolder = SUBFOLDER
