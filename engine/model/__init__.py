"""Model: stream embeddings, MoT blocks with MMSA, generator and detector heads."""
from .block import ExpertWeights, MoTBlock
from .embeddings import patchify, unpatchify
from .heads import DetectorHead, GeneratorHead
from .sampling import euler_sample
from .unigendet import OWNERS, DetOutput, GenOutput, UniGenDet

__all__ = ["UniGenDet", "GenOutput", "DetOutput", "OWNERS", "MoTBlock", "ExpertWeights", "GeneratorHead",
           "DetectorHead", "euler_sample", "patchify", "unpatchify"]
