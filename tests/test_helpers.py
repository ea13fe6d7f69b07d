"""The tests' own rules: a backend that cannot run skips, unless the environment requires it (CI), then it fails."""
import pytest
import torch

from tests import helpers


@pytest.mark.parametrize("require_extension, require_cuda", [(False, False), (True, False), (False, True),
                                                             (True, True)])
@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton", "torch", "sm90-compile"])
def test_a_required_backend_fails_where_others_skip(monkeypatch, backend, require_extension, require_cuda):
    monkeypatch.setattr(helpers, "REQUIRE_EXTENSION", require_extension)
    monkeypatch.setattr(helpers, "REQUIRE_CUDA", require_cuda)
    required = {"cpu": require_extension,
                "cuda": torch.cuda.is_available() and (require_extension or require_cuda),
                "sm90-compile": require_cuda}.get(backend, False)
    helpers.skip_unless_runnable(backend, [])                     # runnable: nothing happens
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match=f"{backend}.*cannot run for a reason; and another"):
        helpers.skip_unless_runnable(backend, ["cannot run for a reason", "and another"])


def test_backend_skipper_asks_the_named_backend_about_the_probe(monkeypatch):
    monkeypatch.setattr(helpers, "REQUIRE_EXTENSION", True)
    asked = []

    class Backend:
        def __init__(self, name, reasons):
            self.name, self.reasons = name, reasons

        def not_supported_reasons(self, *probe):
            asked.append((self.name, probe))
            return self.reasons

    backend_or_skip = helpers.backend_skipper([Backend("cpu", []), Backend("triton", ["no Triton"])],
                                              lambda device, dtype: (device, dtype))
    assert backend_or_skip("cpu", "cpu", torch.float16).name == "cpu"
    with pytest.raises(pytest.skip.Exception, match="triton: no Triton"):
        backend_or_skip("triton", "cpu")
    assert asked == [("cpu", ("cpu", torch.float16)), ("triton", ("cpu", torch.float32))]
