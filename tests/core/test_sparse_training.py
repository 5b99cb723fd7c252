import torch
import torch.nn.functional as F

from core import CGE, SparsityPlan, zo_grasp_ratios
from core.runtime.data import batches, load_dataset
from tests.core.toy_models import small_cnn


def test_two_epochs_of_sparse_cge_on_digits_beat_chance_widely():
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = small_cnn(depth=2, width=16, classes=10)
    ratios = zo_grasp_ratios(model, F.cross_entropy, data.train.x[:200], data.train.y[:200], 0.8, q=16,
                             generator=torch.Generator().manual_seed(0))
    steps_per_epoch = -(-len(data.train) // 32)
    plan = SparsityPlan(model, ratios, refresh_every=steps_per_epoch, seed=0)
    zo = CGE(model, mu=5e-3, sparsity=plan)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for epoch in range(2):
        for x, y in batches(data.train, 32, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            zo.backward(F.cross_entropy, x, y)
            opt.step()
            plan.step()
    model.eval()
    with torch.no_grad():
        acc = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
    assert zo.last_engine == "fast"
    print("accuracy", acc)
    assert acc > 0.5, acc    # chance is 0.1
