"""Training, evaluation (AUC and logloss, scikit-learn) and CPU inference throughput of CTR models."""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score
from tqdm.auto import tqdm

from effkern.data.ctr import CTRData
from effkern.methods.common import load_state, save_state
from effkern.methods.common.distributed import backward, is_main, local_batch, prepare, release
from effkern.ops.low_rank_embedding import bag_rows


@torch.no_grad()
def predict(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 10000) -> torch.Tensor:
    """Click probabilities ``[n]`` on the CPU (eval mode; the batches run on the model's device)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    probs = torch.cat([torch.sigmoid(model(chunk.to(device))).cpu() for chunk in ids.split(batch_size)])
    model.train(was_training)
    return probs


def evaluate(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    """``auc`` and ``logloss`` of the model's predictions (scikit-learn)."""
    p = predict(model, ids).double().numpy()
    y = labels.numpy()
    return dict(auc=float(roc_auc_score(y, p)), logloss=float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7))))


def train_ctr(model: torch.nn.Module, data: CTRData, *, epochs: int, lr: float, batch_size: int = 1024,
              emb_weight_decay: float = 1e-5, patience: int = 1, seed: int = 0, progress: bool = True,
              checkpoint: Path | None = None) -> list[dict]:
    """Adam on the binary cross-entropy over ``data``'s train split, an L2 penalty ``emb_weight_decay`` on the
    looked-up embedding rows (as DeepCTR's l2_reg_embedding), val AUC before training and after every epoch; stops
    after ``patience`` epochs without a better val AUC and restores the best weights seen (the initial ones
    included: fine-tuning never returns a model worse on val than it started). Returns per-epoch rows (epoch,
    train_loss, val_auc, val_logloss). With ``checkpoint``, the whole training state is saved there (atomically)
    after every epoch and a rerun resumes after the last saved epoch, exactly (the shuffling generator included);
    the caller deletes it once the result is kept. The batches run on the model's device."""
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids, labels = data.ids["train"], data.labels["train"]
    g = torch.Generator().manual_seed(seed)
    history, stale, start = [], 0, 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_state(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        best, best_state, stale, history = state["best"], state["best_state"], state["stale"], state["history"]
        start = len(history) if stale < patience else epochs  # a run that had stopped: nothing left to train
    else:
        best = evaluate(model, data.ids["val"], data.labels["val"])["auc"]
        best_state = copy.deepcopy(model.state_dict())
    wrapped, opt = prepare(model, opt)  # data-parallel under `accelerate launch` (effkern.methods.common.distributed)
    device = _device(model)
    bar = tqdm(range(start, epochs), desc="train", disable=not progress or not is_main())
    for epoch in bar:
        model.train()
        total, seen = 0.0, 0
        for idx in torch.randperm(len(labels), generator=g).split(batch_size):
            local = local_batch(idx)
            if local is None:
                continue
            batch = ids[local].to(device)
            loss = F.binary_cross_entropy_with_logits(wrapped(batch), labels[local].to(device))
            penalty = _embedding_penalty(model, batch) * emb_weight_decay if emb_weight_decay else 0.0
            opt.zero_grad(set_to_none=True)
            backward(loss + penalty)
            opt.step()
            total += loss.item() * len(local)
            seen += len(local)
        val = evaluate(model, data.ids["val"], data.labels["val"])
        history.append(dict(epoch=epoch, train_loss=total / max(seen, 1), val_auc=val["auc"],
                            val_logloss=val["logloss"]))
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}", val_auc=f"{val['auc']:.4f}")
        if val["auc"] > best:
            best, best_state, stale = val["auc"], copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        if checkpoint is not None:
            save_state(Path(checkpoint), dict(model=model.state_dict(), opt=opt.state_dict(), generator=g.get_state(),
                                               best=best, best_state=best_state, stale=stale, history=history))
        if stale >= patience:
            break
    release()
    model.load_state_dict(best_state)
    return history


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _embedding_penalty(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared norms of the looked-up embedding rows (compressed rows when compressed)."""
    emb = model.embedding
    table = emb.table if hasattr(emb, "table") else emb.weight
    rows, valid = bag_rows(ids, emb.offsets)
    return table[rows[valid]].square().sum() / ids.shape[0]


@torch.no_grad()
def throughputs(models: dict[str, torch.nn.Module], ids: torch.Tensor, batch_size: int = 4096,
                rounds: int = 15) -> dict[str, float]:
    """Inference samples per second of each model on the CPU at ``batch_size``: the models' batches timed in turn
    (interleaved, so a drift of the machine's speed hits all alike), median per model, after one warm-up batch."""
    batch = ids[:batch_size]
    for model in models.values():
        model.eval()
        model(batch)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(batch)
            times[name].append(time.perf_counter() - start)
    return {name: len(batch) / statistics.median(t) for name, t in times.items()}
