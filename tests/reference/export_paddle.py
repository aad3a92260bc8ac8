"""Export the Paddle reference nets (tests/reference/paddle_models.py) with paddle2onnx.

    python -m tests.reference.export_paddle OUT_DIR      # run in an environment with paddle

For each net, writes OUT_DIR/NAME_train.onnx (the training form, in eval mode: BN uses its
running statistics) and OUT_DIR/NAME_deploy.onnx (after the library's re-parameterization),
both through paddle.jit.save and paddle2onnx.export at opset 13, as users export; and
OUT_DIR/NAME_io.npz: a seeded input `x` and paddle's output `y` for it (the ground truth the
tests hold the ONNX files to). Checks first that the deploy form computes what the training
form does, in paddle. tests/data/paddle/ holds the checked-in result; .ci/paddle-exports
regenerates it and compares (tests/reference/compare_exports.py).
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import paddle
import paddle2onnx

from tests.reference.paddle_models import INPUT_SHAPE, NETS, randomize

OPSET = 13
SEEDS = {"pplcnetv3": 11, "ppyoloe": 12, "pplcnetv2": 13, "pphgnetv2": 14}


def export(net: paddle.nn.Layer, path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "inference")
        spec = [paddle.static.InputSpec([None, *INPUT_SHAPE], "float32", "x")]
        paddle.jit.save(net, prefix, input_spec=spec)
        program = prefix + (".json" if os.path.exists(prefix + ".json") else ".pdmodel")
        paddle2onnx.export(program, prefix + ".pdiparams", path, opset_version=OPSET)


def main(out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    paddle.set_device("cpu")
    for name, make in NETS.items():
        paddle.seed(SEEDS[name])
        net = randomize(make(), SEEDS[name])
        net.eval()
        deploy = net.deploy()
        deploy.eval()
        x = np.random.default_rng(SEEDS[name]).standard_normal((1, *INPUT_SHAPE)).astype(np.float32)
        with paddle.no_grad():
            y = net(paddle.to_tensor(x)).numpy()
            y_deploy = deploy(paddle.to_tensor(x)).numpy()
        np.testing.assert_allclose(y_deploy, y, rtol=1e-4, atol=1e-4 * float(np.abs(y).max()))
        export(net, os.path.join(out_dir, f"{name}_train.onnx"))
        export(deploy, os.path.join(out_dir, f"{name}_deploy.onnx"))
        np.savez(os.path.join(out_dir, f"{name}_io.npz"), x=x, y=y)
        print(f"{name}: exported, deploy form equal in paddle (max abs diff {float(np.abs(y_deploy - y).max()):.2e})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1]))
