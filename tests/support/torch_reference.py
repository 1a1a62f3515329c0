"""A PyTorch reference of the official MoCo step, and weight copies from moco_tf to it.

The torch ResNet reproduces torchvision's module layout and state_dict names (torchvision
itself is not a test dependency); the step is facebookresearch/moco builder.py on one device,
and SplitBatchNorm is the official CIFAR demo's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moco_tf.models.resnet import feature_dim as feature_dim_of


class SplitBatchNorm(nn.BatchNorm2d):
    """The official CIFAR demo's BatchNorm over `num_splits` groups of the batch."""

    def __init__(self, num_features, num_splits):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x):
        n, c, h, w = x.shape
        if self.training or not self.track_running_stats:
            running_mean_split = self.running_mean.repeat(self.num_splits)
            running_var_split = self.running_var.repeat(self.num_splits)
            outcome = F.batch_norm(
                x.view(-1, c * self.num_splits, h, w), running_mean_split, running_var_split,
                self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
                True, self.momentum, self.eps,
            ).view(n, c, h, w)
            self.running_mean.data.copy_(running_mean_split.view(self.num_splits, c).mean(dim=0))
            self.running_var.data.copy_(running_var_split.view(self.num_splits, c).mean(dim=0))
            return outcome
        return super().forward(x)


def _norm(channels, groups):
    return SplitBatchNorm(channels, groups) if groups > 1 else nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(planes, groups)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm(planes, groups)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), _norm(planes, groups))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _norm(planes, groups)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _norm(planes, groups)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _norm(planes * 4, groups)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), _norm(planes * 4, groups)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


SPECS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """torchvision.models.resnet.ResNet's layout; `fc` is whatever head is passed."""

    def __init__(self, depth=18, fc=None, cifar_stem=False, groups=1, width=64):
        super().__init__()
        block, counts = SPECS[depth]
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = _norm(width, groups)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        stage_planes = (width, 2 * width, 4 * width, 8 * width)
        for stage, (planes, count) in enumerate(zip(stage_planes, counts, strict=True), start=1):
            blocks = []
            for index in range(count):
                stride = 2 if stage > 1 and index == 0 else 1
                blocks.append(block(inplanes, planes, stride, groups))
                inplanes = planes * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc if fc is not None else nn.Identity()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def moco_head(in_dim, dim, mlp):
    if mlp:
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, dim))
    return nn.Linear(in_dim, dim)


class OfficialMoCo(nn.Module):
    """builder.MoCo of facebookresearch/moco on one device (no DDP; BN groups stand in for shuffle)."""

    def __init__(self, encoder_q, encoder_k, queue_dk, m, T):
        super().__init__()
        self.encoder_q, self.encoder_k, self.m, self.T = encoder_q, encoder_k, m, T
        self.register_buffer("queue", queue_dk.clone())  # [dim, K] as the official code
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.queue.shape[1] % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.queue.shape[1]

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = F.normalize(self.encoder_k(im_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels


# ------------------------------------------------------------------------------ weight copies
def tf_encoder_state(encoder) -> dict[str, np.ndarray]:
    """A moco_tf Encoder (backbone + head) as a torchvision-named state_dict of numpy arrays."""
    state = {}
    layers = list(encoder.backbone.layers) + list(encoder.head.layers)
    for layer in layers:
        weights = {w.path.split("/")[-1]: np.asarray(w) for w in layer.weights}
        if "kernel" in weights and weights["kernel"].ndim == 4:
            state[f"{layer.name}.weight"] = weights["kernel"].transpose(3, 2, 0, 1)
        elif "kernel" in weights:
            state[f"{layer.name}.weight"] = weights["kernel"].T
            state[f"{layer.name}.bias"] = weights["bias"]
        elif "gamma" in weights:
            state[f"{layer.name}.weight"] = weights["gamma"]
            state[f"{layer.name}.bias"] = weights["beta"]
            state[f"{layer.name}.running_mean"] = weights["moving_mean"]
            state[f"{layer.name}.running_var"] = weights["moving_variance"]
    return state


def load_into_torch(module: nn.Module, state: dict[str, np.ndarray]) -> None:
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(own) == set(state), sorted(set(own) ^ set(state))
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)


# ------------------------------------------------------------------------------ a training loop
class DemoTrainer:
    """The official step on one device from a moco_tf MoCo's exact initial state (weights and
    queue), with the CIFAR demo's single-GPU key shuffle (_batch_shuffle_single_gpu) and SGD
    momentum 0.9: for benchmarks that train both frameworks on the same batches."""

    def __init__(
        self, model, lr: float, weight_decay: float, seed: int = 0, device: str = "cpu", dtype=torch.float32
    ):
        torch.manual_seed(seed)
        depth = int(model.arch.removeprefix("resnet"))
        feature_dim = feature_dim_of(model.arch, model.width)

        def encoder():
            head = moco_head(feature_dim, model.dim, model.mlp)
            net = ResNet(depth, fc=head, cifar_stem=model.cifar_stem, groups=model.bn_groups, width=model.width)
            return net.to(dtype)  # before the weights are copied in: a float32 copy would round them

        self.device = torch.device(device)
        self.encoder_q, encoder_k = encoder(), encoder()
        load_into_torch(self.encoder_q, tf_encoder_state(model.encoder_q))
        load_into_torch(encoder_k, tf_encoder_state(model.encoder_k))
        queue = torch.from_numpy(np.asarray(model.queue).T.copy()).to(dtype)
        self.moco = OfficialMoCo(
            self.encoder_q, encoder_k, queue, model.moco_momentum, model.temperature
        ).to(self.device)
        self.moco.train()
        key_forward = encoder_k.forward
        # The demo draws torch.randperm; a test may swap in moco_tf's permutation to compare steps.
        self.key_permutation = lambda n: torch.randperm(n)

        def shuffled_forward(x):
            idx = self.key_permutation(x.shape[0]).to(x.device)
            return key_forward(x[idx])[torch.argsort(idx)]

        encoder_k.forward = shuffled_forward
        params = self.encoder_q.parameters()
        self.optimizer = torch.optim.SGD(params, lr, momentum=0.9, weight_decay=weight_decay)

    def step(self, views: np.ndarray, lr: float | None = None) -> torch.Tensor:
        """One step on views [N, 2, H, W, C] (NHWC, as moco_tf's pipeline); returns the loss tensor."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        im = torch.from_numpy(views.transpose(0, 1, 4, 2, 3).copy()).to(self.device, non_blocking=True)
        logits, labels = self.moco(im[:, 0], im[:, 1])
        loss = F.cross_entropy(logits, labels.to(self.device))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()
