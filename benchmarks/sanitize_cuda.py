"""One small case of every CUDA kernel (forward and backward), for compute-sanitizer.

compute-sanitizer --tool memcheck python benchmarks/sanitize_cuda.py
"""

import torch

import colabx


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    # context_labels: odd 3D size, t=3, c=3, three levels, fwd + bwd
    b, t, c, shape = 2, 3, 3, (9, 13, 11)
    logits = torch.randn(b, t, *shape, device=dev, generator=g, requires_grad=True)
    labels = torch.randint(0, c, (b, *shape), device=dev, generator=g)
    dist = torch.rand(b, *shape, device=dev, generator=g) * 60
    outs = colabx.context_labels(logits, labels, dist, num_classes=c, levels=3)
    sum((o * torch.rand_like(o)).sum() for o in outs).backward()

    # distance_transform: 2D and 3D batches, anisotropic, one empty item
    for s in [(2, 37, 29), (3, 17, 23, 19)]:
        mask = torch.rand(s, device=dev, generator=g) > 0.97
        mask[0] = False
        colabx.distance_transform(mask, spacing=[0.8] * (len(s) - 2) + [2.5])

    # dice_ce_loss (two levels: soft + hard targets, one launch each, and soft + soft, one launch
    # for both; fp32 and bf16) and roi_bce_loss
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(2, 4, 11, 9, 7, device=dev, generator=g).to(dtype).requires_grad_()
        y = torch.softmax(torch.randn(2, 4, 11, 9, 7, device=dev, generator=g), 1).requires_grad_()
        z2 = torch.randn(2, 4, 5, 4, 3, device=dev, generator=g).to(dtype).requires_grad_()
        y2 = torch.randint(0, 4, (2, 5, 4, 3), device=dev, generator=g)
        colabx.dice_ce_loss([z, z2], [y, y2]).backward()
        y3 = torch.softmax(torch.randn(2, 4, 5, 4, 3, device=dev, generator=g), 1).requires_grad_()
        colabx.dice_ce_loss([z, z2], [y, y3]).backward()
        colabx.roi_bce_loss(z, y.argmax(1), roi_channels=[1, 2]).backward()

    torch.cuda.synchronize()
    print("sanitize_cuda: all kernels ran")


if __name__ == "__main__":
    main()
