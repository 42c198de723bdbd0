"""The whole network's calibration loss as a function of one consumer's input-channel scales.

Criterion "loss" (gfs.pruning.criteria.NetworkLoss) scores a candidate subnetwork of a channel group
by running the *rest of the network* with the consumer's input channel j multiplied by s_j. The
network before the consumer does not change while a group is pruned, so it runs once: the values
live at the consumer (its input X and every other value still needed later, e.g. a residual
block's skip tensor) are taken from the GraphRunner's checkpoint there, and only the tail, from
the consumer to the output, runs per candidate. Several candidates run in one forward pass: their
scaled inputs are stacked along the batch dimension (candidate-major) and every other live value
that depends on the input is repeated to match.

The loss, summed over the calibration batches and divided by the number of samples:

- cross-entropy against the labels, when every calibration batch is ``(x, y)`` with ``y`` an
  integer tensor of shape ``(batch,)`` (class labels; the model's output must be
  ``(batch, classes)`` logits);
- otherwise the mean squared error to the *original* network's outputs on the same inputs (mean
  over the output's entries per sample).

Top-1 (for the ``tolerance=`` stopping rule): with labels, the accuracy; without, the agreement of
the argmax over dimension 1 with the original network's argmax (the original scores 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .groups import UnsupportedModelError


class NetworkLoss:
    """The loss of the network run by ``runner`` on its calibration batches.

    Parameters
    ----------
    runner : GraphRunner
        Runs the network pruned so far (its ``batches`` are the calibration inputs).
    reference : list of Tensor
        The original network's output on each batch.
    labels : list of (Tensor or None)
        Per batch, integer class labels or None; cross-entropy is used when every batch has them.
    batch : int
        Candidates per forward pass (stacked along the batch dimension).
    """

    def __init__(self, runner, reference, labels, *, batch: int = 16):
        self.runner = runner
        self.batch = int(batch)
        for i, r in enumerate(reference):
            if not isinstance(r, torch.Tensor):
                raise UnsupportedModelError(
                    f"criterion 'loss' needs a model whose output is one tensor; on calibration batch {i} it "
                    f"returned a {type(r).__name__}"
                )
        self.reference = [r.detach() for r in reference]
        sizes = [x.shape[0] for x in runner.batches]
        have = [y is not None for y in labels]
        if any(have) and not all(have):
            raise ValueError(
                "calibration: some batches are (x, y) with integer labels and some are not; "
                "give labels for every batch (cross-entropy) or for none (error to the original outputs)"
            )
        self.labels = None
        if all(have):
            for i, (y, r, n) in enumerate(zip(labels, self.reference, sizes, strict=True)):
                if tuple(y.shape) != (n,) or r.dim() != 2:
                    raise ValueError(
                        f"calibration batch {i}: labels have shape {tuple(y.shape)} and the model's output "
                        f"{tuple(r.shape)}; criterion 'loss' takes integer labels of shape ({n},) with "
                        f"(batch, classes) logits, or batches without labels"
                    )
                if n and (int(y.min()) < 0 or int(y.max()) >= r.shape[1]):
                    raise ValueError(
                        f"calibration batch {i}: labels must be in [0, {r.shape[1]}) (the model has "
                        f"{r.shape[1]} outputs), got values in [{int(y.min())}, {int(y.max())}]"
                    )
            self.labels = [y.to(r.device).long() for y, r in zip(labels, self.reference, strict=True)]
        self.kind = "cross_entropy" if self.labels is not None else "mse"
        self.samples = sum(sizes)
        self.classifier = all(r.dim() >= 2 and r.shape[1] >= 2 for r in self.reference)
        self.original_top1 = self._original_top1()
        self._dependent = runner.input_dependent()

    def _original_top1(self) -> float:
        if not self.classifier:
            return float("nan")
        if self.labels is None:
            return 1.0
        hits = sum(int((r.argmax(1) == y).sum()) for r, y in zip(self.reference, self.labels, strict=True))
        return hits / self.samples

    def _losses(self, out, b, copies):
        """(loss sum, top-1 hits) per candidate, float64, from the stacked output of batch b."""
        ref = self.reference[b]
        n = ref.shape[0]
        if tuple(out.shape) != (copies * n, *ref.shape[1:]):
            raise UnsupportedModelError(
                f"criterion 'loss': stacking {copies} candidates along the batch dimension gave an output of "
                f"shape {tuple(out.shape)}, expected {(copies * n, *ref.shape[1:])}; the model's forward "
                f"depends on the batch size (pass loss_batch=1)"
            )
        if self.kind == "cross_entropy":
            y = self.labels[b].repeat(copies)
            logits = out if out.dtype == torch.float64 else out.float()
            loss = F.cross_entropy(logits, y, reduction="none").double().view(copies, n).sum(1)
            hits = (out.argmax(1) == y).view(copies, n).sum(1).double()
            return loss, hits
        d = (out.double().view(copies, n, -1) - ref.double().reshape(1, n, -1)) ** 2
        loss = d.mean(2).sum(1)
        if self.classifier:
            hits = (out.argmax(1).view(copies, n, -1) == ref.argmax(1).reshape(1, n, -1)).double().mean(2).sum(1)
        else:
            hits = torch.full((copies,), float("nan"), dtype=torch.float64, device=out.device)
        return loss, hits

    def at(self, consumer_node, channel_dim: int) -> ConsumerTail:
        """The loss as a function of the scales of ``consumer_node``'s input channels (dimension
        ``channel_dim`` of its input), from the runner's checkpoint at the consumer."""
        position = self.runner.pos[consumer_node]
        if position not in self.runner.checkpoints:  # pragma: no cover - api takes it
            raise RuntimeError("no checkpoint at the consumer: run the runner up to it first")
        return ConsumerTail(self, position, consumer_node.args[0], channel_dim)


class ConsumerTail:
    """The network from one consumer to the output, with the consumer's input channels scaled."""

    def __init__(self, net: NetworkLoss, position: int, input_node, channel_dim: int):
        self.net, self.position, self.input_node, self.channel_dim = net, position, input_node, channel_dim
        self.kind, self.original_top1 = net.kind, net.original_top1
        self.envs = net.runner.checkpoints[position]
        self.evaluations = 0
        self.batch = net.batch
        sizes = [x.shape[0] for x in net.runner.batches]
        for env, n in zip(self.envs, sizes, strict=True):
            for node, v in env.items():
                if node is input_node or node not in net._dependent:
                    continue
                if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n:
                    self.batch = 1  # a live value that cannot be repeated: one candidate per pass
        self._checked = self.batch == 1

    def _scaled(self, X, S):
        """X (n, ...) with channel j times S[c, j], for each row c of S: (len(S) * n, ...)."""
        dim = self.channel_dim % X.dim()
        shape = [S.shape[0]] + [1] * X.dim()
        shape[dim + 1] = S.shape[1]
        return (X.unsqueeze(0) * S.to(X.dtype).view(shape)).reshape(S.shape[0] * X.shape[0], *X.shape[1:])

    def _env(self, b, S):
        """The live values of batch b for the rows of S (C, N): the consumer's input scaled, every
        other input-dependent tensor repeated C times (candidate-major), constants as they are."""
        env0, copies = self.envs[b], S.shape[0]
        env = {}
        for node, v in env0.items():
            if node is self.input_node:
                env[node] = self._scaled(v, S)
            elif node in self.net._dependent and isinstance(v, torch.Tensor):
                env[node] = v.repeat(copies, *([1] * (v.dim() - 1)))  # a copy even for one candidate
            else:
                env[node] = v
        return env

    @torch.no_grad()
    def evaluate(self, scales: torch.Tensor):
        """Loss and top-1 of the network for each row of ``scales`` (C, N): two float64 (C,)
        tensors (top-1 NaN when the output is not (batch, classes))."""
        scales = scales.double()
        C = scales.shape[0]
        loss = torch.zeros(C, dtype=torch.float64)
        hits = torch.zeros(C, dtype=torch.float64)
        runner = self.net.runner
        for b in range(len(self.envs)):
            dev = self.envs[b][self.input_node].device
            for c0 in range(0, C, self.batch):
                S = scales[c0 : c0 + self.batch].to(dev)
                out = runner.run_tail(self.position, self._env(b, S))
                if not isinstance(out, torch.Tensor):
                    raise UnsupportedModelError("criterion 'loss' needs a model whose output is one tensor")
                lo, hi = self.net._losses(out, b, S.shape[0])
                if not self._checked and S.shape[0] > 1:  # stacking must not mix candidates: check once
                    alone = runner.run_tail(self.position, self._env(b, S[:1]))
                    l1, _ = self.net._losses(alone, b, 1)
                    if not torch.allclose(l1, lo[:1], rtol=1e-4, atol=1e-6 * max(1.0, float(l1.abs()))):
                        raise UnsupportedModelError(
                            "criterion 'loss': a candidate's loss changes when candidates are stacked along the "
                            "batch dimension (the model mixes samples of a batch); pass loss_batch=1"
                        )
                    self._checked = True
                loss[c0 : c0 + S.shape[0]] += lo.cpu()
                hits[c0 : c0 + S.shape[0]] += hi.cpu()
        self.evaluations += C
        n = self.net.samples
        return loss / n, hits / n

    def gradient(self, scale: torch.Tensor) -> torch.Tensor:
        """d loss / d s at the scales ``scale`` (N,): float64 (N,). One forward and backward pass
        of the tail per calibration batch; gradients reach ``s`` only (torch.autograd.grad: the
        model's parameters' .grad are not touched)."""
        g = torch.zeros(scale.shape[0], dtype=torch.float64)
        runner = self.net.runner
        for b in range(len(self.envs)):
            X = self.envs[b][self.input_node]
            s = scale.to(device=X.device, dtype=X.dtype).clone().requires_grad_(True)
            with torch.enable_grad():
                env = self._env(b, s.detach()[None])
                env[self.input_node] = self._scaled(X, s[None])  # the same, with the graph to s
                out = runner.run_tail(self.position, env)
                lo, _ = self.net._losses(out, b, 1)
                (grad,) = torch.autograd.grad(lo.sum() / self.net.samples, s)
            g += grad.double().cpu()
        return g
