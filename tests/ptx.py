"""The kernels' inline PTX (worker/pallas_kernels: moe_matmul's MXFP4, qmatvec's nibbles), interpreted instruction by
instruction on numpy arrays, so that the CPU's tests check what the card runs: the asm's text, on every input."""

from __future__ import annotations

import numpy as np


def _f16_values(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint16).view(np.float16).astype(np.float64)


def bf16_round(f: np.ndarray) -> np.ndarray:
    """float32 values -> bf16 bits, round to nearest even (finite values)."""
    u = f.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def packed_bytes(values: np.ndarray) -> np.ndarray:
    """Bytes (any 8-bit dtype) as the asm's registers take them with pack=4: four a uint32, element j in byte j."""
    words = values.view(np.uint8).reshape(-1, 4).astype(np.uint32)
    return words[:, 0] | words[:, 1] << 8 | words[:, 2] << 16 | words[:, 3] << 24


def packed_halves(bits: np.ndarray) -> list[np.ndarray]:
    """16-bit values (their bits, any unsigned dtype) as pack=4 gives them: two registers of two, element j in half
    j % 2 of register j // 2."""
    pairs = bits.astype(np.uint32).reshape(-1, 4)
    return [pairs[:, 0] | pairs[:, 1] << 16, pairs[:, 2] | pairs[:, 3] << 16]


def unpacked_halves(out: dict[int, np.ndarray]) -> np.ndarray:
    """The asm's two output registers ($0, $1) of 16-bit halves back to one value a element, uint32, in order."""
    return np.stack([out[0] & 0xFFFF, out[0] >> 16, out[1] & 0xFFFF, out[1] >> 16], axis=1).reshape(-1)


def run_ptx(asm: str, operands: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The PTX of an inline asm, instruction by instruction on numpy uint32 arrays, for the few instructions
    the kernels' asm takes (their semantics from the PTX ISA): mov, and, or, xor, shl, shr, mul.lo.u32, prmt
    (default mode: a byte of {b, a} per selector nibble, bit 3 of the nibble replicating that byte's sign),
    mul.rn.bf16x2 (each half a bf16 product rounded to nearest even; subnormals kept), sub.f16x2, mul.rn.f16x2 and
    fma.rn.f16x2 (each half computed exactly, then rounded to the nearest float16 once). Anything else fails: the
    test must cover what the card runs. `operands`: $N -> its 32-bit values; returns them after the asm (the
    outputs among them)."""
    regs: dict[str, np.ndarray] = {f"${n}": v.astype(np.uint32) for n, v in operands.items()}

    def val(token: str) -> np.ndarray:
        return regs[token] if token in regs else np.uint32(int(token, 0))

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        a = [val(t) for t in src]
        if op == "mov.b32":
            out = a[0]
        elif op == "and.b32":
            out = a[0] & a[1]
        elif op == "or.b32":
            out = a[0] | a[1]
        elif op == "shl.b32":
            out = (a[0].astype(np.uint64) << np.uint64(a[1])).astype(np.uint32)
        elif op == "xor.b32":
            out = a[0] ^ a[1]
        elif op == "shr.b32":
            out = a[0] >> np.asarray(a[1], np.uint32)
        elif op == "mul.lo.u32":
            out = (a[0].astype(np.uint64) * np.uint64(a[1]) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        elif op in ("sub.f16x2", "mul.rn.f16x2", "fma.rn.f16x2"):
            halves = []
            for shift in (0, 16):
                v = [_f16_values((np.broadcast_to(t, np.shape(a[0])) >> shift) & 0xFFFF) for t in a]
                product = v[0] * v[1] + (v[2] if op == "fma.rn.f16x2" else 0.0)
                exact = v[0] - v[1] if op == "sub.f16x2" else product  # exact in float64 here
                halves.append(exact.astype(np.float16).view(np.uint16).astype(np.uint32) << shift)  # rounded once
            out = halves[0] | halves[1]
        elif op == "prmt.b32":
            pool = (np.asarray(a[1], np.uint64) << np.uint64(32)) | np.asarray(a[0], np.uint64)
            out = np.zeros(np.shape(pool), np.uint32)
            for i in range(4):
                sel = (int(a[2]) >> (4 * i)) & 0xF
                byte = ((pool >> np.uint64(8 * (sel & 7))) & np.uint64(0xFF)).astype(np.uint32)
                if sel & 8:
                    byte = np.where(byte & 0x80, 0xFF, 0).astype(np.uint32)
                out = out | (byte << (8 * i))
        elif op == "mul.rn.bf16x2":
            halves = []
            for shift in (0, 16):
                x, y = ((np.broadcast_to(v, np.shape(a[0] | a[1])) >> shift) & 0xFFFF for v in a)
                halves.append(bf16_round(_bf16_values(x).astype(np.float64) * _bf16_values(y)) << shift)
            out = halves[0] | halves[1]
        else:
            raise AssertionError(f"run_ptx: {op} is not interpreted")
        regs[d] = np.broadcast_to(out, np.shape(out)).astype(np.uint32)
    return {int(k[1:]): v for k, v in regs.items() if k.startswith("$")}
