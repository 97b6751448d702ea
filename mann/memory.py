"""Reading and writing the memory matrix M [B, N, W]: pure functions shared by the NTM and the DNC.

Sources: Graves, Wayne & Danihelka (2014), §3.1-3.2 (read, erase, add); Graves et al. (2016), Methods
("Reading and writing to memory"); Csordás & Schmidhuber (2019), §3.2, Eq. 1 (de-allocation).
"""

from __future__ import annotations

import torch
from torch import Tensor


def read(memory: Tensor, weights: Tensor) -> Tensor:
    """Read vectors r = sum_i w[i] M[i] (NTM Eq. 2; DNC r = M^T w), one per read head.

    memory: [B, N, W]; weights: [B, R, N] -> [B, R, W].
    """
    return torch.einsum("brn,bnw->brw", weights, memory)


def erase_and_add(memory: Tensor, write_weights: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    """M_t = M_{t-1} * prod_h (E - w_h e_h^T) + sum_h w_h a_h^T (NTM Eqs. 3-4; DNC write).

    memory: [B, N, W]; write_weights w: [B, Hw, N]; erase e: [B, Hw, W] in [0, 1]; add a: [B, Hw, W]
    -> [B, N, W]. With several write heads the erasures multiply (so their order does not matter) and the
    adds are summed, as NTM §3.2 describes. With Hw = 1 this is the DNC's write equation.
    """
    keep = torch.prod(1 - write_weights[..., :, None] * erase[..., None, :], dim=1)  # [B, N, W]
    return memory * keep + torch.einsum("bhn,bhw->bnw", write_weights, add)


def deallocate(memory: Tensor, psi: Tensor) -> Tensor:
    """Erase what the free gates released: M * psi 1^T (Csordás & Schmidhuber 2019, §3.2, Eq. 1).

    memory: [B, N, W]; psi (retention, :func:`mann.addressing.retention`): [B, N] -> [B, N, W].
    Their write is M_t = M_{t-1} * psi 1^T * (E - w e^T) + w v^T, i.e.
    ``erase_and_add(deallocate(memory, psi), w, e, v)``. Without it a freed slot keeps its content and
    content look-up still finds it (aliasing); zeroed, it scores ~0 against any key.
    """
    return memory * psi[..., None]
