"""Second-order gradual pruning: the Optimal BERT Surgeon (Kurtic et al. 2022, "The Optimal BERT Surgeon: Scalable
and Accurate Second-Order Pruning for Large Language Models", EMNLP 2022, arXiv:2203.07259), after Optimal Brain
Surgeon (Hassibi & Stork 1992) and WoodFisher (Singh & Alistarh 2020)."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..linear import is_conv1d, matrix_view, stored_layout
from ..sharding import is_sharded
from .base import PruningMethod, register_method, same_dtype

# Bytes of block inverses ([blocks, B, B] float32) built at once: bounds a mask update's memory whatever the layer's
# size. Each of the m rank-1 updates rewrites the whole chunk, so memory traffic, not arithmetic, is the cost; of 1, 4
# and 32 MiB, 4 was the fastest on a 2-core VM (0.40 s against 0.47 s for the scores of a 384x1536 layer).
CHUNK_BYTES = 4 << 20


class ObsMethod(PruningMethod):
    """Optimal Brain Surgeon with a block-wise empirical Fisher, the oBERT criterion (Kurtic et al. 2022).

    Near a minimum, the loss increase of removing weight i and letting the others move optimally is
    rho_i = w_i^2 / (2 [F^-1]_ii), and the optimal move of the others is delta_w = -F^-1 e_i w_i / [F^-1]_ii
    (Hassibi & Stork 1992), with F the Hessian. oBERT approximates F by the empirical Fisher of recent gradients,
    restricted to blocks of B consecutive weights of the flattened (out, in) matrix (correlations across blocks are
    dropped; the inverse of a block-diagonal F is the block-diagonal of the inverses):

        F_block = lambda * I + (1/m) sum_k g_k g_k^T          (the block's part of the m most recent gradients)

    - Every optimizer step (`on_gradients`): the complete gradient of each targeted layer is copied into a ring of
      the last `obs_num_gradients` (m) gradients, one batched `torch._foreach_copy_` for all layers. Nothing else runs
      per step.
    - At a mask update (`scores`): the diagonal of each block's inverse is computed from the ring in closed form
      (Woodbury: with m < B an m x m Cholesky solve per block and no B x B matrix; batched over blocks in chunks of
      CHUNK_BYTES; as lambda F^-1 = (I + U^T U)^-1 with the gradients scaled by 1 / sqrt(m lambda), so the numbers
      stay near 1), and rho is returned: higher = keep.
      For block and N:M patterns `Pruner` ranks the pattern's aggregate of rho, as for every criterion.
    - Once `Pruner` has chosen the masks (`on_masks_updated`): in every block, with Q the weights pruned now,
      delta_w = -F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q (Q's rows land at exactly zero, the kept weights compensate), one
      padded |B|x|B| batched solve per chunk. The inverses are built again there rather than kept from `scores`:
      keeping them would hold B floats per targeted weight (128 bytes at B=32) for the whole update.

    Weights already pruned (exactly zero: `Pruner` zeroes them after every optimizer step) have their gradients
    masked out of F, as oBERT does: F then has no coupling between pruned and kept weights, so (F^-1) restricted to
    the kept weights is the inverse of the kept weights' Fisher (the saliency of the problem actually solved), and the
    update leaves the pruned weights at zero.

    Dampening. lambda = `obs_damp` x the layer's mean squared gradient over its kept weights: relative, because
    gradients' scale varies by orders of magnitude across models, layers and training; oBERT's absolute 1e-7 was
    tuned for m=1024 gradients per block of 50. With m (16) below B (32) the empirical Fisher is singular: in the
    directions no recent gradient saw, lambda alone sets the curvature, and a lambda that is tiny next to the
    gradients would let the update move weights far along directions the loss was never measured in, and leave
    float32 subtracting nearly equal numbers in I - U^T (I + U U^T)^-1 U. 1e-2 (SparseGPT's dampening, 1% of the
    mean Hessian diagonal) keeps the inverses well conditioned; larger values move towards magnitude pruning
    (F -> lambda I gives rho proportional to w^2 and no update). A tiny BERT pruned once to 90% from 16 gradients
    (its loss right after the update; dense 0.056): relative 1e-4 gave 0.068, worse than magnitude's 0.064; 1e-2
    gave 0.062, 1e-1 0.061, 10 0.064.

    Memory: the ring holds m x (targeted weights) x 4 bytes (float32: gradients' outer products in bf16 keep 3 digits,
    too few for inverses), e.g. 16 x 10.6M x 4 = 680 MB for MiniLM-L6's blocks, and it is saved in every checkpoint
    (`state_dict`) so that a resumed run ends as an uninterrupted one. Time: per step, the copy (about 6 ms for
    MiniLM-L6's 10.6M weights on 2 CPU threads, as much as one masking pass); per mask update, about 2 m (m + B)
    multiply-adds per weight for the scores and a B x B inverse per block that loses weights for the update.
    Measured on one CPU thread with MiniLM-L6's 36 layers (m=16, B=32) when the inverses were built by m Sherman-
    Morrison rank-1 updates: about 19 s per mask update (7.5 s scores, 11 s update); the closed forms halve it (one
    384x1536 and one 1536x384 layer, side by side in one run: scores 1.19 -> 0.56 s, update 2.26 -> 1.08 s, results
    equal to 3e-6 relative). On a CPU choose a `pruning_interval` that makes mask updates rare, as oBERT's recipes do.

    Not supported under FSDP2 (sharded parameters): blocks would need whole gradients gathered every step. DDP is
    fine: gradients are all-reduced before `on_gradients`, so every rank builds the same Fisher and the same masks.
    """

    needs_gradients = True

    def attach(self, modules: dict[str, nn.Module]) -> None:
        sharded = [name for name, module in modules.items() if is_sharded(module.weight)]
        if sharded:
            raise ValueError(
                f"hf_prune: PruningConfig.method='obs' is not supported under FSDP2 (sharded parameters, e.g. "
                f"{sharded[0]!r}): its block Fisher needs every layer's whole gradient at every step. Use DDP or one "
                "process, or method 'magnitude' / 'movement' under FSDP2."
            )
        super().attach(modules)
        self.num_gradients = self.config.obs_num_gradients
        self.block_size = self.config.obs_block_size
        # Per layer: the ring [m, *weight.shape] (float32, allocated at the layer's first gradient, on its device),
        # how many of its slots hold a gradient, and the slot the next gradient goes to.
        self.ring: dict[str, torch.Tensor] = {}
        self._slots: dict[str, tuple[torch.Tensor, ...]] = {}  # the ring's rows as views, to index without torch ops
        self.count: dict[str, int] = {}
        self.position: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------ per step
    def _allocate(self, name: str, like: torch.Tensor) -> torch.Tensor:
        ring = torch.zeros((self.num_gradients, *like.shape), dtype=torch.float32, device=like.device)
        self.ring[name] = ring
        self._slots[name] = ring.unbind(0)
        self.count.setdefault(name, 0)
        self.position.setdefault(name, 0)
        return ring

    @torch.no_grad()
    def on_gradients(self, names: Sequence[str], weights: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        for name, grad in zip(names, grads):
            if name not in self.ring:
                self._allocate(name, grad)
        slots = [self._slots[name][self.position[name]] for name in names]
        if same_dtype(slots, grads):
            torch._foreach_copy_(slots, grads)  # one batched copy over all layers: the whole per-step cost
        else:
            for slot, grad in zip(slots, grads):
                slot.copy_(grad)  # bf16/fp16 gradients are converted on the way in
        for name in names:
            self.position[name] = (self.position[name] + 1) % self.num_gradients
            self.count[name] = min(self.count[name] + 1, self.num_gradients)

    # ------------------------------------------------------------------------------------------------ mask update
    def _blocks(self, matrix: torch.Tensor) -> torch.Tensor:
        """(..., out, in) -> (..., num_blocks, B): flattened row-major, zero-padded to a whole last block."""
        flat = matrix.reshape(*matrix.shape[:-2], -1)
        pad = -flat.shape[-1] % self.block_size
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        return flat.reshape(*flat.shape[:-1], -1, self.block_size)

    def _unblock(self, blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return blocks.reshape(-1)[: shape[0] * shape[1]].reshape(shape)

    def _scaled_gradients(self, name: str, module: nn.Module) -> tuple[Optional[torch.Tensor], float]:
        """The layer's recent gradients in blocks, [m, num_blocks, B], scaled so that F / lambda = I + sum u u^T,
        with the already-pruned (zero) weights' entries masked out; and lambda. None when there are no gradients."""
        weight = matrix_view(module, module.weight.detach())
        count = self.count.get(name, 0)
        kept = weight != 0
        num_kept = int(kept.sum())
        if count == 0 or num_kept == 0:
            return None, self.config.obs_damp
        ring = self.ring[name][:count]
        # Rows of the ring hold gradients in the stored layout; blocks are cut from the (out, in) view.
        grads = (ring.transpose(-1, -2) if is_conv1d(module) else ring) * kept  # a copy: the ring stays raw
        mean_square = float(grads.square().sum()) / (count * num_kept)
        if not mean_square > 0:
            # No signal at all (a layer whose gradients were all zero): F = damp * I, which ranks by magnitude and
            # moves nothing; the absolute damp keeps such a layer cheap to prune under global scope, as F says.
            return None, self.config.obs_damp
        damp = self.config.obs_damp * mean_square
        grads.mul_((count * damp) ** -0.5)  # u_k = g_k / sqrt(m * lambda): F / lambda = I + sum_k u_k u_k^T
        return self._blocks(grads), damp

    def _inverses(self, grads: torch.Tensor, index: Optional[torch.Tensor], num_blocks: int,
                  diagonal_only: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks of lambda * F^-1 = (I + U^T U)^-1 for the blocks `index` (all when None), U the block's [m, B]
        scaled gradients: pairs (block indices, [c, B, B]), or (block indices, [c, B]) its diagonal only.

        Closed forms, both through a Cholesky factor of a matrix whose eigenvalues are >= 1 (well conditioned in
        float32 whatever lambda): with fewer gradients than weights per block (m < B, the usual case), Woodbury,
        (I + U^T U)^-1 = I - U^T (I_m + U U^T)^-1 U, an m x m system per block; its diagonal needs no B x B matrix
        at all. Otherwise the B x B matrix I + U^T U is factored and inverted."""
        B = self.block_size
        device = grads.device
        if index is None:
            index = torch.arange(num_blocks, device=device)
        chunk = max(1, CHUNK_BYTES // (4 * B * B))
        for start in range(0, index.numel(), chunk):
            rows = index[start:start + chunk]
            u = grads[:, rows].transpose(0, 1)  # [c, m, B]
            m = u.shape[1]
            if m < B:
                gram = torch.baddbmm(torch.eye(m, device=device).expand(rows.numel(), m, m), u, u.transpose(1, 2))
                # With I_m + U U^T = L L^T, U^T (L L^T)^-1 U = Z^T Z for Z = L^-1 U: one triangular solve where
                # cholesky_solve makes two, and the diagonal is a sum of squares (2.2x faster for the scores, 1.6x
                # for the inverses, one 1024-block chunk on one thread; equal to 2e-7).
                z = torch.linalg.solve_triangular(torch.linalg.cholesky(gram), u, upper=False)  # [c, m, B]
                if diagonal_only:
                    yield rows, 1.0 - z.square().sum(1)
                else:
                    eye = torch.eye(B, device=device).expand(rows.numel(), B, B)
                    yield rows, torch.baddbmm(eye, z.transpose(1, 2), z, alpha=-1.0)
            else:
                eye = torch.eye(B, device=device).expand(rows.numel(), B, B)
                inverse = torch.cholesky_inverse(torch.linalg.cholesky(torch.baddbmm(eye, u.transpose(1, 2), u)))
                yield rows, inverse.diagonal(dim1=-2, dim2=-1) if diagonal_only else inverse

    @torch.no_grad()
    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        """OBS saliency rho = w^2 / (2 [F^-1]_ii) of every weight, the stored layout, float32; higher = keep."""
        weight = matrix_view(module, module.weight.detach()).float()
        weights = self._blocks(weight)
        grads, damp = self._scaled_gradients(name, module)
        diagonal = torch.ones_like(weights)  # of lambda * F^-1
        if grads is not None:
            for rows, block_diagonal in self._inverses(grads, None, weights.shape[0], diagonal_only=True):
                diagonal[rows] = block_diagonal
        # [F^-1]_ii = diagonal / lambda. Pruned weights score 0 here; Pruner ranks them last anyway.
        saliency = weights.square().mul_(damp / 2).div_(diagonal)
        matrix = self._unblock(saliency, weight.shape)
        return stored_layout(module, matrix)

    @torch.no_grad()
    def on_masks_updated(self, name: str, module: nn.Module, newly_pruned: torch.Tensor) -> None:
        """The OBS update: the kept weights of every block compensate the weights pruned in it at this step."""
        target = matrix_view(module, module.weight.data)
        pruned = self._blocks(matrix_view(module, newly_pruned).to(device=target.device, dtype=torch.bool))
        index = pruned.any(-1).nonzero().squeeze(-1)  # only blocks that lose a weight now move
        if index.numel() == 0:
            return
        grads, _ = self._scaled_gradients(name, module)
        if grads is None:
            return  # F = lambda I: no coupling, nothing to compensate (Pruner zeroes the pruned weights)
        weights = self._blocks(target.float())
        delta = torch.zeros_like(weights)
        eye = torch.eye(self.block_size, device=weights.device)
        for rows, inverse in self._inverses(grads, index, weights.shape[0]):
            q = pruned[rows].to(inverse.dtype)  # [c, B], 1 on Q
            # A = F^-1[Q, Q] padded with the identity outside Q, so one batched solve serves blocks of any |Q|;
            # x = A^-1 w_Q is zero outside Q. The scale lambda of lambda * F^-1 cancels in F^-1[:, Q] F^-1[Q, Q]^-1.
            system = inverse * (q.unsqueeze(-1) * q.unsqueeze(-2)) + eye * (1.0 - q).unsqueeze(-1)
            x = torch.linalg.solve(system, (weights[rows] * q).unsqueeze(-1))
            delta[rows] = -torch.bmm(inverse, x).squeeze(-1)
        update = self._unblock(delta, target.shape)
        target.add_(update.to(target.dtype))
        # In exact arithmetic w_Q + delta_Q = 0; make it exact (Pruner zeroes them next anyway).
        target.masked_fill_(matrix_view(module, newly_pruned).to(target.device, torch.bool), 0.0)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The ring of every layer (m x weights x 4 bytes: 16 x 10.6M x 4 = 680 MB for MiniLM-L6), how many of its
        slots hold a gradient and the next slot: a resumed run builds the same Fisher as an uninterrupted one. The
        tensors are the live buffers (as `nn.Module.state_dict` gives them): a checkpoint writes them at once."""
        return {
            "num_gradients": self.num_gradients,
            "ring": dict(self.ring),
            "count": {name: self.count[name] for name in self.ring},
            "position": {name: self.position[name] for name in self.ring},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in state.get("ring", {}).items():
            if name not in self.modules:
                continue
            weight = self.modules[name].weight
            if tuple(saved.shape[1:]) != tuple(weight.shape):
                raise ValueError(f"the obs gradients of {name!r} have shape {tuple(saved.shape[1:])}, the weight "
                                 f"{tuple(weight.shape)}")
            count, position = int(state["count"][name]), int(state["position"][name])
            ring = self.ring[name] if name in self.ring else self._allocate(name, weight)
            ring.zero_()
            if saved.shape[0] == self.num_gradients:
                ring.copy_(saved)  # slot for slot: the same order of rank-1 updates as the uninterrupted run
                self.count[name], self.position[name] = count, position
                continue
            # obs_num_gradients changed (allow_resume_changes): keep the most recent gradients that fit, oldest first.
            size = saved.shape[0]
            order = list(range(count)) if count < size else [(position + i) % size for i in range(size)]
            kept = order[-self.num_gradients:]
            ring[: len(kept)].copy_(saved[kept])
            self.count[name], self.position[name] = len(kept), len(kept) % self.num_gradients


register_method("obs", ObsMethod)
