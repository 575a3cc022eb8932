"""#15's backend question (bench/backend.py): the jax-triton port of the per-row int8-x Q4_K matvec
(bench/triton_matvec.py) must give the Pallas kernel's split-K partials bit for bit on the card, so that timing
the two compares backends, not arithmetic. GPU only: jax-triton calls Triton on the card (its wheel carried in
.whl/); on the CPU `python -m bench.backend --interpret` checks the same in Triton's interpreter, where the
`triton` package is installed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_pallas_qmatvec import _gpu, _on_device


# phi3-mini's gate_up and attention output; a weight whose N is not a multiple of the 64-column tile and whose K
# takes splits of several steps
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16384, 3072), (3072, 3072), (72, 1280)])
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_the_jax_triton_port_gives_the_pallas_kernels_partials(shape, rows):
    _gpu()
    from bench import backend, triton_matvec

    n, k = shape
    w = _on_device(QT.Q4_K, shape, seed=rows)
    x = jax.random.normal(jax.random.key(rows), (rows + 1, k), jnp.float32)  # a padded last group where rows > 1
    p = backend.plan(n, k)
    x_args, planes = backend.inputs(x, w, rows, False)
    port = np.asarray(triton_matvec.partials(x_args, planes, n, k, p, rows, p.num_warps, p.num_stages))
    pallas = np.asarray(backend.pallas_partials(x, w, rows, False))
    assert port.shape == pallas.shape
    np.testing.assert_array_equal(port.view(np.uint32), pallas.view(np.uint32))


def test_the_benchs_pallas_side_is_the_workers_int8_x_matvec():
    """What bench.backend times and compares the port with is qmatvec's per-row int8-x call, to the bit (interpret
    mode here): the same quantized x, planes, plan and fold."""
    from bench import backend
    from worker.pallas_kernels import qmatvec as qmv

    n, k = 72, 1280
    w = _on_device(QT.Q4_K, (n, k), seed=0)
    x = jax.random.normal(jax.random.key(0), (2, k), jnp.float32)
    folded = qmv.fold_splits(backend.pallas_partials(x, w, 2, True))[:2, :n]
    served = qmv.qmatvec(x, w, interpret=True, tensor_cores=False, int8_x=True)
    np.testing.assert_array_equal(np.asarray(folded).view(np.uint32), np.asarray(served).view(np.uint32))
