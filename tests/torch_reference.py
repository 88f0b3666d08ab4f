"""Independent PyTorch reference for the original Swin Transformer and DeiT/ViT backbones.

Written from SPEC §1 (structure) and §5 (state_dict key names) for the parity tests of the
JAX/Flax port; it is not copied from any released code. Module and parameter names are
chosen so that ``state_dict()`` yields exactly the original key names and shapes:

* Swin: ``patch_embed.proj``, ``patch_embed.norm``, ``absolute_pos_embed`` (only with
  ``ape``), ``layers.{i}.blocks.{j}.{norm1,attn,norm2,mlp}``, the buffers
  ``attn.relative_position_index`` and ``attn_mask`` (the latter only on shifted blocks),
  ``layers.{i}.downsample.{norm,reduction}`` (not on the last stage), ``norm``, ``head``
  (only with ``num_classes > 0``).
* DeiT / timm ViT: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``.

Everything is float32. Dropout rates are 0 (no parameters); stochastic depth is per sample.
The "bn" Swin variant uses a real ``nn.BatchNorm1d`` over (batch x tokens) for ``norm2``.
"""
import torch
import torch.nn as nn


def relative_position_index(window_size):
    """(ws*ws, ws*ws) int64: (dy+ws-1)*(2ws-1) + (dx+ws-1) for row-major tokens a, b."""
    ws = window_size
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    dy = ys[:, None] - ys[None, :] + ws - 1
    dx = xs[:, None] - xs[None, :] + ws - 1
    return (dy * (2 * ws - 1) + dx).long()


def window_partition(x, ws):
    """(B, H, W, C) -> (B*nW, ws*ws, C); windows row-major, tokens row-major inside."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows, ws, H, W):
    """Inverse of :func:`window_partition`: (B*nW, ws*ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def shifted_window_mask(H, W, window_size, shift):
    """(nW, ws*ws, ws*ws) float32: -100.0 between tokens of different shift regions, else 0."""
    ws = window_size
    labels = torch.zeros(1, H, W, 1)
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    cnt = 0
    for hs in slices:
        for wsl in slices:
            labels[:, hs, wsl, :] = cnt
            cnt += 1
    lw = window_partition(labels, ws).squeeze(-1)  # (nW, ws*ws)
    diff = lw.unsqueeze(1) - lw.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class DropPath(nn.Module):
    """Per-sample stochastic depth; rescales kept samples by 1/keep. Identity in eval."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x / keep * mask


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------- Swin


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads, qkv_bias=True):
        super().__init__()
        self.dim, self.ws, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)  # (B_, h, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, h).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, h, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(B_, h, N, N)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, resolution, num_heads, window_size, shift_size, mlp_ratio,
                 qkv_bias, drop_path, norm_before_mlp):
        super().__init__()
        self.dim, self.resolution = dim, resolution
        if min(resolution) <= window_size:  # window rule (SPEC §1)
            window_size, shift_size = min(resolution), 0
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        if norm_before_mlp == "ln":
            self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        elif norm_before_mlp == "bn":
            self.norm2 = nn.BatchNorm1d(dim, eps=1e-5, momentum=0.1)
        else:
            raise ValueError(f"norm_before_mlp must be 'ln' or 'bn', got {norm_before_mlp!r}")
        self.norm_before_mlp = norm_before_mlp
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift_size > 0:
            H, W = resolution
            self.register_buffer("attn_mask", shifted_window_mask(H, W, window_size, shift_size))
        else:
            self.register_buffer("attn_mask", None)

    def _norm2(self, x):
        if self.norm_before_mlp == "bn":
            B, L, C = x.shape
            return self.norm2(x.reshape(B * L, C)).view(B, L, C)
        return self.norm2(x)

    def forward(self, x):
        H, W = self.resolution
        B, L, C = x.shape
        ws, s = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = self.attn(window_partition(x, ws), mask=self.attn_mask)
        x = window_reverse(x, ws, H, W)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self._norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, resolution, dim):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        H, W = self.resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window_size, mlp_ratio, qkv_bias,
                 drop_path, norm_before_mlp, downsample):
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, resolution, num_heads, window_size,
                                 0 if j % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias,
                                 drop_path[j], norm_before_mlp)
            for j in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim, norm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5) if norm else None

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, H*W, C), row-major over H then W
        return self.norm(x) if self.norm is not None else x


def _init_linear_ln(m):
    """Linear: trunc normal std .02, bias 0; LayerNorm: weight 1, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class SwinTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=0, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, ape=False, patch_norm=True,
                 norm_before_mlp="ln"):
        super().__init__()
        self.num_layers = len(depths)
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.ape = ape
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        pr = img_size // patch_size
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, pr * pr, embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(0.0)
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            res = (pr // 2 ** i, pr // 2 ** i)
            self.layers.append(BasicLayer(
                int(embed_dim * 2 ** i), res, depths[i], num_heads[i], window_size, mlp_ratio,
                qkv_bias, dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_before_mlp,
                downsample=i < self.num_layers - 1))
        self.norm = nn.LayerNorm(self.num_features, eps=1e-5)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else None
        self.apply(_init_linear_ln)

    def _embed(self, x):
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        return self.pos_drop(x)

    def forward_stages(self, x):
        """List of per-stage (B, H_i, W_i, C_i) outputs before patch merging, un-normed."""
        x = self._embed(x)
        outs = []
        for layer in self.layers:
            for blk in layer.blocks:
                x = blk(x)
            H, W = layer.resolution
            outs.append(x.view(x.shape[0], H, W, -1))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return outs

    def forward_features(self, x):
        """Final LayerNorm then mean over tokens: (B, num_features)."""
        x = self._embed(x)
        for layer in self.layers:
            for blk in layer.blocks:
                x = blk(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return self.norm(x).mean(dim=1)

    def forward(self, x):
        x = self.forward_features(x)
        return self.head(x) if self.head is not None else x


# ----------------------------------------------------------------------------- DeiT / ViT


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """timm VisionTransformer as configured for DeiT (cls token, LayerNorm eps 1e-6)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=384,
                 depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0):
        super().__init__()
        self.num_features = embed_dim
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_ln)

    def forward_features(self, x):
        """Final LayerNorm output of the cls token: (B, embed_dim)."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def forward(self, x):
        x = self.forward_features(x)
        return self.head(x) if self.head is not None else x


# ----------------------------------------------------------------------------- helpers


def like(model, drop_path_rate=None):
    """The reference with the architecture of a moby_jax backbone module (reads its fields).

    Only hyperparameters are read, never weights or code. ``drop_path_rate`` defaults to
    the module's.
    """
    dp = model.drop_path_rate if drop_path_rate is None else drop_path_rate
    common = dict(img_size=model.img_size, patch_size=model.patch_size,
                  num_classes=model.num_classes, embed_dim=model.embed_dim,
                  mlp_ratio=model.mlp_ratio, qkv_bias=model.qkv_bias, drop_path_rate=dp)
    if hasattr(model, "depths"):
        return SwinTransformer(depths=tuple(model.depths), num_heads=tuple(model.num_heads),
                               window_size=model.window_size, ape=model.ape,
                               patch_norm=model.patch_norm,
                               norm_before_mlp=model.norm_before_mlp, **common)
    return VisionTransformer(depth=model.depth, num_heads=model.num_heads, **common)
