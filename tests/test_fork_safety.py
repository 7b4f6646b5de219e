"""Workers fork()ed from a process that used ONNX Runtime do not hang (datasets.generate fork_pool, with
before_fork and forked_child): a session dropped in a reference cycle, with the station's sleeping (non-spinning)
threads, hangs a child whose garbage collector destroys it. Seen once as a test run that never ended (a documented
walk's ``vialinspect generate`` after models had been run in the same process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import gc, multiprocessing as mp, sys, time
    import numpy as np, onnxruntime as ort
    from onnx import TensorProto, helper
    from vialinspect.datasets.generate import fork_pool

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.ones(64 * 64, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the station's setting
    s = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                             .SerializeToString(), so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": np.ones((256, 64), np.float32)})
    junk = [s]
    junk.append(junk)
    del s, junk  # unreachable, in a cycle: only the garbage collector destroys it
    time.sleep(0.3)  # its threads asleep on their condition variable
    gc.disable()  # the collector has not come round before the fork
    safe = sys.argv[1] == "safe"
    pool = fork_pool(1, lambda: None) if safe else mp.get_context("fork").Pool(1)
    with pool:
        try:
            pool.apply_async(gc.collect).get(timeout=8)
        except mp.TimeoutError:
            print("hung")
            sys.exit(3)
    print("done")
''')


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)


def test_a_forked_worker_survives_an_onnx_session_its_parent_dropped():
    done = _run("safe")
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stdout + done.stderr


def test_without_the_fork_helpers_the_same_worker_hangs():
    # The case above is a real one on this ONNX Runtime: in a plain fork pool the child hangs.
    hung = _run("unsafe")
    assert hung.returncode == 3 and hung.stdout.strip() == "hung", hung.stdout + hung.stderr
