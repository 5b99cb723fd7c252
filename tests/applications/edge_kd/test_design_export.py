"""Device profiles, the designed student checked by independent real counters, and the ONNX export."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from applications.edge_kd import learners
from applications.edge_kd.counters import peak_bytes
from applications.edge_kd.design import design_student, student_spec
from applications.edge_kd.export import TOLERANCE, deployment_check, export_onnx, max_difference, session
from applications.edge_kd.kd import kd_loss
from applications.edge_kd.profiles import load_profile
from core.models import from_spec
from core.runtime.blocks import OptimConfig, ZOConfig
from core.runtime.errors import UserError

MNIST = (1, 28, 28)
NORM = {"mean": [0.1307], "std": [0.3081]}


def _loss(out, target):
    y, z_t, has = target
    return kd_loss(out, y, z_t, alpha=0.5, temperature=4.0, has_teacher=has)


def test_peak_bytes_sees_exactly_what_a_function_allocates():
    def work():
        a = torch.empty(262_144)          # 1 MiB
        b = torch.empty(131_072)          # 0.5 MiB while a is alive
        del a, b
        torch.empty(65_536)

    assert peak_bytes(work) == (262_144 + 131_072) * 4


def test_the_designed_student_meets_every_constraint_by_independent_counters():
    profile = load_profile("rpi4")
    design = design_student(profile, input_shape=MNIST, num_classes=10, normalize=NORM, ref_depth=3, ref_width=48)
    kw = design.spec["kwargs"]
    assert kw["width"] % 8 == 0 and kw["depth"] == 3 and kw["width"] < 48
    model = from_spec(design.spec).eval()
    x = torch.rand(1, *MNIST)

    def counted(m):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(x)
        return fc.get_total_flops()

    flops = counted(model)
    weights = sum(p.numel() for p in model.parameters()) * profile.bytes_per_param
    with torch.no_grad():
        activations = peak_bytes(lambda: model(x))
    assert weights <= profile.storage_bytes
    assert flops / profile.flops_per_s <= profile.max_latency_s
    assert weights + activations <= profile.ram_bytes
    assert [r["constraint"] for r in design.rows()] == ["storage", "latency (FLOPs / P_eff)", "inference RAM"]
    assert design.student.values["latency (FLOPs / P_eff)"] == pytest.approx(flops / profile.flops_per_s)
    assert all(r["slack"] >= 0 for r in design.rows())
    # the widest that fits: 8 more channels break the deadline
    wider = from_spec(student_spec(3, kw["width"] + 8, MNIST, 10, NORM)).eval()
    assert counted(wider) / profile.flops_per_s > profile.max_latency_s
    assert design.probes[0][1] == 8 * int(design.closed_form_width // 8)      # the search starts at the closed form


def test_a_users_profile_file_and_an_impossible_budget(tmp_path):
    path = tmp_path / "watch.yaml"
    path.write_text("name: smart watch\nstorage_bytes: 4096\nram_bytes: 65536\nflops_per_s: 1.0e+8\n"
                    "max_latency_s: 0.01\nbytes_per_param: 1\n")
    profile = load_profile(str(path))
    design = design_student(profile, input_shape=MNIST, num_classes=10, normalize=NORM, ref_depth=3, ref_width=48)
    assert design.student.params <= 4096 and design.student.fits            # storage binds: 4 KiB of int8
    tight = dataclasses.replace(profile, max_latency_s=1e-6)
    with pytest.raises(UserError, match=r"no student fits device profile 'smart watch': even the smallest \(cnn "
                                        r"depth 1, width 8\) needs latency"):
        design_student(tight, input_shape=MNIST, num_classes=10, normalize=NORM, ref_depth=3, ref_width=48)


@pytest.mark.parametrize("text,expected", [
    ("name: x\nstorage_bytes: 10\nram_bytes: 10\nflops_per_s: 1.0e+9\nmax_latency_s: 0.1\n",
     "lacks 'bytes_per_param'"),
    ("name: x\nstorage_bytes: -10\nram_bytes: 10\nflops_per_s: 1.0e+9\nmax_latency_s: 0.1\nbytes_per_param: 4\n",
     "'storage_bytes' must be a positive number; got -10"),
    ("name: x\nstorage_bytes: 10\nram_bytes: 10\nflops_per_s: fast\nmax_latency_s: 0.1\nbytes_per_param: 4\n",
     "'flops_per_s' must be a positive number"),
    ("name: x\nstorage: 10\n", "unknown key 'storage'"),
    ("- a list\n", "must be a YAML mapping"),
])
def test_malformed_profiles_are_one_line_errors(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=expected) as info:
        load_profile(str(path))
    assert "\n" not in str(info.value)


def test_forward_only_training_fits_where_backprop_does_not():
    """The measured training step of MeZO against backprop's, as the design's training-RAM constraint."""
    zo, optim = ZOConfig(sparsity=0.0), OptimConfig(lr=0.01)
    x, y = torch.rand(32, *MNIST), torch.randint(0, 10, (32,))
    target = (y, torch.randn(32, 10), None)
    spec = student_spec(2, 8, MNIST, 10, NORM)
    fo = learners.step_memory(spec, "fo", _loss, x, target, zo=zo, optim=optim)
    mezo = learners.step_memory(spec, "zo-mezo", _loss, x, target, zo=zo, optim=optim)
    assert mezo < 0.85 * fo
    profile = dataclasses.replace(load_profile("rpi4"), name="tight", ram_bytes=(fo + mezo) // 2)

    def train_bytes(method):
        return lambda s: learners.step_memory(s, method, _loss, x, target, zo=zo, optim=optim)

    design = design_student(profile, input_shape=MNIST, num_classes=10, normalize=NORM, ref_depth=2, ref_width=8,
                            train_bytes=train_bytes("zo-mezo"))
    assert design.student.values["training RAM"] == mezo and design.student.fits
    with pytest.raises(UserError, match="training RAM"):
        design_student(profile, input_shape=MNIST, num_classes=10, normalize=NORM, ref_depth=1, ref_width=8,
                       train_bytes=train_bytes("fo"))


def test_onnx_export_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = from_spec(student_spec(2, 16, MNIST, 10, NORM)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):                                   # move BN's running statistics off their defaults
        opt.zero_grad()
        F.cross_entropy(model(torch.rand(16, *MNIST)), torch.randint(0, 10, (16,))).backward()
        opt.step()
    model.eval()
    path = export_onnx(model, MNIST, tmp_path / "student.onnx")
    sess = session(path)
    x = torch.rand(37, *MNIST)                           # another batch size than the export's
    assert max_difference(model, sess, x) <= TOLERANCE
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    assert torch.equal(got.argmax(1), model(x).argmax(1))
    profile = load_profile("rpi4")
    out = deployment_check(model, MNIST, x, tmp_path / "again.onnx", profile=profile, repeats=5,
                           host_flops_per_s=2e9)
    assert out["onnx_max_abs_diff"] <= TOLERANCE and out["latency_onnxruntime_s"] > 0
    assert out["latency_device_measured_s"] == pytest.approx(out["latency_onnxruntime_s"] * 2e9 / 5e9)
    assert out["latency_device_flops_s"] == pytest.approx(out["forward_flops"] / 5e9)
