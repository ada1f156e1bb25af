"""Without the compiled extension, `import jsigr_fast` still works, warns once, and runs pure PyTorch."""
import os
import subprocess
import sys
import textwrap

BLOCK_EXTENSION = textwrap.dedent("""
    import importlib.abc, sys, warnings
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "jsigr_fast._C":
                raise ImportError("simulated: extension not built")
    sys.meta_path.insert(0, Block())
    warnings.simplefilter("always")
""")


def _run(body: str) -> subprocess.CompletedProcess:
    code = BLOCK_EXTENSION + textwrap.dedent(body)
    env = dict(os.environ, PYTHONWARNINGS="always")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_warns_once_and_falls_back_to_reference():
    r = _run("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import jsigr_fast
            import jsigr_fast.ops, jsigr_fast.functional, jsigr_fast.fused   # re-imports must not warn again
        msgs = [str(w.message) for w in caught if "compiled extension could not be loaded" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "simulated: extension not built" in msgs[0]
        assert not jsigr_fast.extension_loaded()
        assert jsigr_fast.available_backends() == ["reference"]
        import torch
        from jsigr_fast.testing import tiny_model, tiny_input
        m, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
        y = torch.tensor([0, 1, 2, 3, 0])
        auto = jsigr_fast.loss(m, x, y, generator=torch.Generator().manual_seed(0))
        ref = jsigr_fast.loss(m, x, y, backend="reference", generator=torch.Generator().manual_seed(0))
        assert torch.equal(auto, ref)
        auto.backward()
        assert torch.equal(jsigr_fast.masked_sq_norm(x, None), (x * x).flatten(1).sum(1))
        try:
            jsigr_fast.loss(m, x, y, backend="fused")
        except RuntimeError as e:
            assert "backend='fused' is not available" in str(e) and "extension is not loaded" in str(e), e
        else:
            raise AssertionError("fused without the extension must fail clearly")
        print("OK")
    """)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
