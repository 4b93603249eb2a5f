"""A model tracked through a container that is never called itself - a GAN as
`ModuleDict({"G": G, "D": D})`, models in a ModuleList - had no forward pass at all: 0 ms of
forward, no batch, 0 micro-steps, and no activations by module. The callable modules the
container holds are the passes."""
import torch

import memprof


def _gan():
    torch.manual_seed(0)
    g = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    d = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    return g, d


def _train(g, d, steps=4, batch=32):
    opt_g, opt_d = torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())
    softplus = torch.nn.functional.softplus
    for _ in range(steps):
        fake = g(torch.randn(batch, 8))
        loss_d = softplus(-d(torch.randn(batch, 16))).mean() + softplus(d(fake.detach())).mean()
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad()
        softplus(-d(fake)).mean().backward()
        opt_g.step()
        opt_g.zero_grad()


def test_a_gan_in_a_module_dict_has_forward_passes():
    g, d = _gan()
    models = torch.nn.ModuleDict({"G": g, "D": d})
    with memprof.track(models, optimizer=None) as prof:
        _train(g, d)
    t = prof.throughput
    assert t["batch_size"] == 32 and t["micro_steps_per_step"] >= 1
    assert t["stats"]["forward_ms"]["median"] > 0
    acts = prof.activations_by_module()
    assert {"G.1", "D.1"} <= set(acts)        # the ReLUs' saved outputs, named in each model
    assert prof.breakdown("phase", at="peak").get("forward", 0) > 0
    for m in models.modules():                 # nothing left behind
        assert not m._forward_pre_hooks and not m._forward_hooks and "forward" not in vars(m)


def test_models_in_a_module_list_have_forward_passes():
    g, d = _gan()
    with memprof.track(torch.nn.ModuleList([g, d]), optimizer=None) as both:
        _train(g, d, steps=2)
    assert both.throughput["batch_size"] == 32
    assert {"ModuleList.0.1", "ModuleList.1.1"} <= set(both.activations_by_module())


class _Discriminator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.lin(x) + x.repeat(1, 1000).sum(1, keepdim=True) * 0   # D's own memory


def test_a_compiled_model_in_a_container_shifts_no_other_models_name():
    """torch.compile's wrapper and its model are one module: the passes' ids came from the
    module count instead, and D's own memory went to `D.lin`."""
    g, _ = _gan()
    d = _Discriminator()
    models = torch.nn.ModuleDict({"G": torch.compile(g, backend="eager"), "D": d})
    with memprof.track(models, optimizer=None) as prof:
        d(torch.randn(4, 16))
    peak = {r["module"] for r in [prof.peak_event]}
    assert peak == {"D"}   # the 4 x 16,000 repeat, in D's own forward


def test_evaluation_is_apart_with_a_given_batch_size():
    g, _ = _gan()
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    with memprof.track(g, opt, batch_size=32) as prof:
        for _ in range(4):
            g(torch.randn(32, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                for _ in range(5):
                    g(torch.randn(512, 8))
    per = prof.throughput["per_step"]   # (each step's window holds the evaluation before it)
    assert all(e > 0 for e in per["eval_ms"][1:]) and prof.throughput["batch_size"] == 32


def test_auto_mode_names_each_model_by_what_the_code_calls_it():
    """Two models called apart with no container (`memprof run` on a GAN script): both were
    `Sequential`, so G's and D's layers read as one (`Sequential.1` summed both ReLUs)."""
    g, d = _gan()
    with memprof.track(auto_modules=True, optimizer=None) as prof:
        _train(g, d)
    names = [prof.module_name(i) for i in range(len(prof.modules))]
    assert len(set(names)) == len(names), names
    acts = prof.activations_by_module()
    # each ReLU keeps its output (batch 32 x 32 floats) per call: G once a step, D 3 times
    assert acts["g.1"] == 4 * 32 * 32 * 4
    assert acts["d.1"] == 3 * 4 * 32 * 32 * 4
    tracker = memprof.track(auto_modules=True, optimizer=None)
    with tracker:
        _train(g, d, steps=1)
        params = set(tracker.session.scope.parameter_names().values())   # health's names
    assert params == {f"{m}.{i}.{w}" for m in "gd" for i in (0, 2) for w in ("weight", "bias")}


def _train_listed(nets, steps=2):
    for _ in range(steps):
        x = torch.randn(32, 8)
        for i in range(len(nets)):
            x = nets[i](x)          # no name for either model here
        x.sum().backward()


def test_models_with_no_name_of_their_own_are_told_apart_by_class():
    g = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    h = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with memprof.track(auto_modules=True, optimizer=None) as prof:
        _train_listed([g, h])
    names = [prof.module_name(i) for i in range(len(prof.modules))]
    assert len(set(names)) == len(names), names
    acts = prof.activations_by_module()
    assert acts["Sequential.1"] == acts["Sequential_2.1"] == 2 * 32 * 32 * 4


class _Tower(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.GELU(),
                                        torch.nn.Linear(width, 4))

    def forward(self, x):
        return self.body(x)


class Teacher(_Tower):
    pass


class Student(_Tower):
    pass


def _distil(teacher, student, steps=3):
    opt = torch.optim.SGD(student.parameters(), lr=0.1)   # gone when the block ends
    for _ in range(steps):
        x = torch.randn(16, 8)
        with torch.no_grad():
            target = teacher(x).softmax(-1)
        loss = torch.nn.functional.cross_entropy(student(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_a_student_and_its_teacher_are_named_apart_and_the_student_is_the_model():
    """The teacher runs first: its layers read as the model's own (`body.0` beside
    `student.body.0`) and the report was titled after it."""
    teacher, student = Teacher(64), Student(16)
    with memprof.track(auto_modules=True) as prof:
        _distil(teacher, student)
    assert {"teacher", "teacher.body.0", "student", "student.body.2"} <= set(prof.modules)
    assert prof.meta["model_class"] == "Student"
    acts = prof.activations_by_module()
    assert acts["student.body.1"] == 3 * 16 * 16 * 4    # its GELU's output, which the last
    #                                                     Linear keeps for backward
    assert "teacher.body.1" not in acts                 # no gradients: nothing kept


def test_models_kept_in_a_dict_beside_the_loop_are_not_its_model():
    """A ModuleDict of teacher and student kept for saving: it became the root of both (the
    report titled `ModuleDict`), though the loop calls each model by itself."""
    teacher, student = Teacher(64), Student(16)
    both = torch.nn.ModuleDict({"teacher": teacher, "student": student})   # noqa: F841
    with memprof.track(auto_modules=True) as prof:
        _distil(teacher, student)
    assert prof.meta["model_class"] == "Student"
    assert {"teacher", "student", "student.body.2"} <= set(prof.modules)


def test_a_loss_module_beside_the_model_leaves_the_models_names_as_they_were():
    """A loss module called apart is a root too; with no parameters it does not make the
    run one of several models: the model's layers keep their names."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    criterion = torch.nn.CrossEntropyLoss()
    with memprof.track(auto_modules=True) as prof:
        for _ in range(2):
            criterion(model(torch.randn(8, 8)), torch.randint(0, 4, (8,))).backward()
    assert set(prof.modules) == {"", "0", "1", "2", "criterion"}
    assert prof.activations_by_module()["Sequential.1"] == 2 * 8 * 16 * 4
    assert prof.meta["model_class"] == "Sequential"


def _names(prof) -> list[str]:
    return [prof.module_name(i) for i in range(len(prof.modules))]


def test_roots_stay_apart_when_a_later_root_takes_in_the_first_and_behind_compile():
    enc, other = torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 8))
    calls = [enc, other, torch.nn.Sequential(enc)]    # the last one holds the first root
    with memprof.track(auto_modules=True, optimizer=None) as prof:
        x = torch.randn(4, 8, requires_grad=True)
        for i in range(3):
            y = calls[i](x)
        y.sum().backward()
    assert len(set(_names(prof))) == len(_names(prof)), _names(prof)
    g = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    nets = [g, torch.compile(torch.nn.Linear(8, 8), backend="eager")]
    with memprof.track(auto_modules=True, optimizer=None) as compiled:
        x = torch.randn(4, 8)
        for i in range(2):
            x = nets[i](x)
        x.sum().backward()
    assert "Linear" in compiled.modules                # the user's class, not OptimizedModule


class _Trainer:
    """A trainer whose own attributes are not a module's (`_modules` a list of names)."""

    def __init__(self):
        self._modules = ["g", "d"]
        self.g, self.d = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)

    def step(self):
        return self.d(self.g(torch.randn(4, 8))).sum()


def test_naming_reads_a_trainers_attributes_and_leaves_its_locals_as_they_are():
    """Naming a root raised ValueError out of the user's call on a `self` whose `_modules`
    was no dict, and emptied the dict `locals()` had returned to the calling function."""
    trainer = _Trainer()
    with memprof.track(auto_modules=True, optimizer=None) as prof:
        trainer.step().backward()
    assert {"g", "d"} <= set(prof.modules)

    def train(model):
        lr = 0.1
        hparams = locals()
        model(torch.randn(2, 8)).sum().backward()
        return hparams, lr
    with memprof.track(auto_modules=True, optimizer=None):
        hparams, lr = train(torch.nn.Linear(8, 8))
    assert hparams["lr"] == lr and "model" in hparams


def test_layers_called_one_by_one_are_named_in_the_model_that_holds_them():
    """`model[0](x)`, `model[1](h)`, ... (a loop that runs a Sequential's layers itself): each
    layer was a root of its own, `Linear` and `Linear_2`, and the report was titled `Linear`."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with memprof.track(auto_modules=True) as prof:
        for _ in range(2):
            h = model[1](model[0](torch.randn(16, 8)))
            model[2](h).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert set(prof.modules) == {"", "0", "1", "2"}
    assert prof.meta["model_class"] == "Sequential"
    assert prof.activations_by_module()["Sequential.1"] == 2 * 16 * 32 * 4   # the ReLU's output


class _Wrapper(torch.nn.Module):
    """A LightningModule's shape: a forward of its own that the training step never calls
    (`training_step` runs `self.net(x)`)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def test_a_model_whose_forward_is_never_called_has_its_childrens_calls_as_passes():
    """track(lit_module) around trainer.fit: 0 micro-steps, 0 ms forward, no batch size
    (track(batch_size=8) did not help), the activations in no forward."""
    torch.manual_seed(0)
    w = _Wrapper()
    opt = torch.optim.AdamW(w.parameters(), lr=1e-3)
    data = [(torch.randn(8, 32), torch.randint(0, 10, (8,))) for _ in range(12)]
    with memprof.track(w, opt) as prof:
        for i, (x, y) in enumerate(data):
            (torch.nn.functional.cross_entropy(w.net(x), y) / 4).backward()
            if (i + 1) % 4 == 0:
                opt.step()
                opt.zero_grad()
    t = prof.throughput
    assert t["micro_steps_per_step"] == 4 and t["batch_size"] == 8
    assert t["stats"]["forward_ms"]["median"] > 0
    assert prof.activations_by_module()["net.1"] > 0     # the ReLU's output, kept for backward
    assert "inputs" not in prof.run.records or not prof.run.records["inputs"]   # not forward's
    # once the model itself is called, its children are no passes of their own
    with memprof.track(w, opt) as called:
        for x, y in data[:4]:
            torch.nn.functional.cross_entropy(w(x), y).backward()
            w.net(x)                       # outside the model's pass: no pass
        opt.step()
    assert called.throughput["per_step"]["micro_steps"] == [4]
    # an evaluation `w(x)` under no_grad between steps keeps the children the passes (the
    # steps after it read 0 micro-steps)
    with memprof.track(w, opt) as evaluated:
        for i, (x, y) in enumerate(data[:6]):
            torch.nn.functional.cross_entropy(w.net(x), y).backward()
            opt.step()
            opt.zero_grad()
            if i == 2:
                with torch.no_grad():
                    w(x)
    assert evaluated.throughput["per_step"]["micro_steps"] == [1] * 6
