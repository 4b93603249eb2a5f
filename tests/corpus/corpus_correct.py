"""Correct training loops rebuilt (not copied) from public, well-known sources, shrunk to a
fraction of a second on a CPU with random data. memprof must find nothing in any of them."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from corpus_common import Case, loader, tracked


# ---------------------------------------------------------------- pytorch/examples mnist/main.py
class MnistNet(nn.Module):
    """Two convolutions, max-pool, two dropouts, two linears, log-softmax (14x14 inputs)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.dropout2(F.relu(self.fc1(torch.flatten(self.dropout1(x), 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def mnist_test(model, test_loader) -> tuple[float, int]:
    model.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += output.argmax(dim=1).eq(target).sum().item()
    return test_loss / len(test_loader.dataset), correct


def mnist():
    torch.manual_seed(0)
    model = MnistNet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    train_loader = loader(torch.randn(64, 1, 14, 14), torch.randint(0, 10, (64,)), batch_size=16,
                          shuffle=True)
    test_loader = loader(torch.randn(32, 1, 14, 14), torch.randint(0, 10, (32,)), batch_size=16)
    with tracked(model, optimizer) as prof:
        for epoch in range(2):
            model.train()
            for data, target in train_loader:
                optimizer.zero_grad()
                loss = F.nll_loss(model(data), target)
                loss.backward()
                optimizer.step()
            mnist_test(model, test_loader)
            scheduler.step()
    return prof


# ------------------------------------ pytorch/examples word_language_model/main.py and model.py
class RNNModel(nn.Module):
    """Embedding -> dropout -> LSTM -> dropout -> linear decoder -> log-softmax."""

    def __init__(self, ntoken=40, ninp=16, nhid=16, nlayers=2):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)
        self.ntoken, self.nhid, self.nlayers = ntoken, nhid, nlayers

    def forward(self, x, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid))


def repackage_hidden(h):
    """Detach hidden states from their history (truncated backpropagation through time)."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def lm_evaluate(model, source, bptt, bsz) -> float:
    model.eval()
    total, hidden = 0.0, model.init_hidden(bsz)
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, bptt):
            data, targets = source[i:i + bptt], source[i + 1:i + 1 + bptt].reshape(-1)
            output, hidden = model(data[:len(targets) // bsz], hidden)
            hidden = repackage_hidden(hidden)
            total += len(data) * F.nll_loss(output, targets).item()
    return total / (len(source) - 1)


def word_language_model():
    """The example's default path: no torch.optim, `p.data.add_(p.grad, alpha=-lr)`."""
    torch.manual_seed(0)
    bsz, bptt, lr, clip = 4, 6, 20.0, 0.25
    model = RNNModel()
    train_data = torch.randint(0, model.ntoken, (6 * bptt + 1, bsz))
    val_data = torch.randint(0, model.ntoken, (2 * bptt + 1, bsz))
    with tracked(model) as prof:
        model.train()
        total_loss, hidden = 0.0, model.init_hidden(bsz)
        for i in range(0, train_data.size(0) - 1, bptt):
            data, targets = train_data[i:i + bptt], train_data[i + 1:i + 1 + bptt].reshape(-1)
            model.zero_grad()
            hidden = repackage_hidden(hidden)
            output, hidden = model(data, hidden)
            loss = F.nll_loss(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            total_loss += loss.item()
        lm_evaluate(model, val_data, bptt, bsz)
    return prof


# ---------------------------------------------------------------- pytorch/examples dcgan/main.py
def dcgan():
    """Generator and discriminator (16x16 images), two Adam optimizers, D on fake.detach()."""
    torch.manual_seed(0)
    nz, ngf, ndf, nc, batch = 8, 8, 8, 3, 8
    net_g = nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2),
        nn.ReLU(True), nn.ConvTranspose2d(ngf * 2, nc, 4, 2, 1, bias=False), nn.Tanh())
    net_d = nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2),
        nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False), nn.Sigmoid())
    criterion = nn.BCELoss()
    optimizer_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizer_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    dataloader = loader(torch.rand(48, nc, 16, 16) * 2 - 1, batch_size=batch)
    with tracked() as prof:
        for (real,) in dataloader:
            net_d.zero_grad()
            label = torch.full((real.size(0),), 1.0)
            err_d_real = criterion(net_d(real).view(-1), label)
            err_d_real.backward()
            d_x = err_d_real.item()
            fake = net_g(torch.randn(real.size(0), nz, 1, 1))
            label.fill_(0.0)
            err_d_fake = criterion(net_d(fake.detach()).view(-1), label)
            err_d_fake.backward()
            err_d = err_d_real + err_d_fake
            optimizer_d.step()
            net_g.zero_grad()
            label.fill_(1.0)
            output = net_d(fake).view(-1)
            err_g = criterion(output, label)
            err_g.backward()
            optimizer_g.step()
            print(f"Loss_D {err_d.item():.4f} Loss_G {err_g.item():.4f} D(x) {d_x:.4f}")
    return prof


# ----------------------------------------------------------------- pytorch/examples vae/main.py
class VAE(nn.Module):
    def __init__(self, d=64, h=32, z=8):
        super().__init__()
        self.d = d
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, h), nn.Linear(h, z), nn.Linear(h, z)
        self.fc3, self.fc4 = nn.Linear(z, h), nn.Linear(h, d)

    def forward(self, x):
        h1 = F.relu(self.fc1(x.view(-1, self.d)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def vae_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, recon_x.size(1)), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def vae():
    torch.manual_seed(0)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_loader = loader(torch.rand(96, 1, 8, 8), batch_size=16, shuffle=True)
    test_loader = loader(torch.rand(32, 1, 8, 8), batch_size=16)
    with tracked(model, optimizer) as prof:
        model.train()
        train_loss = 0.0
        for (data,) in train_loader:
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = vae_loss(recon_batch, data, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        model.eval()
        test_loss = 0.0
        with torch.no_grad():
            for (data,) in test_loader:
                recon_batch, mu, logvar = model(data)
                test_loss += vae_loss(recon_batch, data, mu, logvar).item()
    return prof


# ----------------------------------------------------- pytorch/examples siamese_network/main.py
class SiameseNetwork(nn.Module):
    """One shared feature extractor (a small CNN in place of ResNet-18) for both images; the two
    feature vectors concatenated, an MLP, a sigmoid."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Sequential(nn.Linear(32, 16), nn.ReLU(inplace=True), nn.Linear(16, 1))

    def forward_once(self, x):
        return self.features(x).view(x.size(0), -1)

    def forward(self, a, b):
        return torch.sigmoid(self.fc(torch.cat((self.forward_once(a), self.forward_once(b)), 1)))


def siamese_network():
    torch.manual_seed(0)
    model = SiameseNetwork()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    criterion = nn.BCELoss()
    train_loader = loader(torch.randn(64, 1, 12, 12), torch.randn(64, 1, 12, 12),
                          torch.randint(0, 2, (64,)).float(), batch_size=16)
    with tracked(model, optimizer) as prof:
        for epoch in range(2):
            model.train()
            for images_1, images_2, targets in train_loader:
                optimizer.zero_grad()
                loss = criterion(model(images_1, images_2).squeeze(), targets)
                loss.backward()
                optimizer.step()
            scheduler.step()
    return prof


# ------------------------------------------- pytorch/examples time_sequence_prediction/train.py
class Sequence(nn.Module):
    """Two stacked LSTM cells and a linear read-out, unrolled over time, float64; `future`
    extra steps fed with the model's own prediction."""

    def __init__(self, hidden=12):
        super().__init__()
        self.hidden = hidden
        self.lstm1, self.lstm2 = nn.LSTMCell(1, hidden), nn.LSTMCell(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)

    def forward(self, x, future=0):
        outputs = []
        h1 = c1 = h2 = c2 = torch.zeros(x.size(0), self.hidden, dtype=torch.double)
        output = None
        for x_t in x.split(1, dim=1):
            h1, c1 = self.lstm1(x_t, (h1, c1))
            h2, c2 = self.lstm2(h1, (h2, c2))
            output = self.linear(h2)
            outputs.append(output)
        for _ in range(future):
            h1, c1 = self.lstm1(output, (h1, c1))
            h2, c2 = self.lstm2(h1, (h2, c2))
            output = self.linear(h2)
            outputs.append(output)
        return torch.cat(outputs, dim=1)


def time_sequence_prediction():
    """LBFGS with a closure (several forward/backward passes per optimizer step)."""
    torch.manual_seed(0)
    t = torch.arange(21, dtype=torch.double) / 3 + torch.randint(-4, 4, (6, 1)).double()
    data = torch.sin(t)
    train_in, train_target = data[2:, :-1], data[2:, 1:]
    test_in, test_target = data[:2, :-1], data[:2, 1:]
    seq = Sequence().double()
    criterion = nn.MSELoss()
    optimizer = torch.optim.LBFGS(seq.parameters(), lr=0.8, max_iter=3)
    with tracked(seq, optimizer) as prof:
        for _ in range(4):
            def closure():
                optimizer.zero_grad()
                loss = criterion(seq(train_in), train_target)
                loss.backward()
                return loss
            optimizer.step(closure)
            with torch.no_grad():
                future = 5
                pred = seq(test_in, future=future)
                criterion(pred[:, :-future], test_target).item()
                pred.detach().numpy()
    return prof


# ------------------------------------- pytorch/examples super_resolution/model.py and main.py
class SuperResolutionNet(nn.Module):
    def __init__(self, upscale_factor=2):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 5, 1, 2), nn.Conv2d(16, 16, 3, 1, 1)
        self.conv3 = nn.Conv2d(16, 8, 3, 1, 1)
        self.conv4 = nn.Conv2d(8, upscale_factor ** 2, 3, 1, 1)
        self.pixel_shuffle = nn.PixelShuffle(upscale_factor)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.pixel_shuffle(self.conv4(x))


def super_resolution():
    torch.manual_seed(0)
    model = SuperResolutionNet()
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_loader = loader(torch.rand(48, 1, 8, 8), torch.rand(48, 1, 16, 16), batch_size=8)
    test_loader = loader(torch.rand(16, 1, 8, 8), torch.rand(16, 1, 16, 16), batch_size=8)
    with tracked(model, optimizer) as prof:
        epoch_loss = 0.0
        for inp, target in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(inp), target)
            epoch_loss += loss.item()
            loss.backward()
            optimizer.step()
        avg_psnr = 0.0
        with torch.no_grad():
            for inp, target in test_loader:
                mse = criterion(model(inp), target)
                avg_psnr += 10 * math.log10(1 / mse.item())
    return prof


# ---------------------------------- pytorch/examples reinforcement_learning/actor_critic.py
class Policy(nn.Module):
    """Actor and critic heads on one hidden layer; the episode's (log_prob, value) pairs are
    kept in `saved_actions` until the episode's update, then cleared."""

    def __init__(self):
        super().__init__()
        self.affine1 = nn.Linear(4, 32)
        self.action_head, self.value_head = nn.Linear(32, 2), nn.Linear(32, 1)
        self.saved_actions, self.rewards = [], []

    def forward(self, x):
        x = F.relu(self.affine1(x))
        return F.softmax(self.action_head(x), dim=-1), self.value_head(x)


def actor_critic():
    """A random environment in code (CartPole needs gym): 4-d states, episodes of 6-10 steps."""
    torch.manual_seed(0)
    model = Policy()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    gamma, eps = 0.99, 1e-6
    with tracked(model, optimizer) as prof:
        for episode in range(5):
            for _ in range(6 + episode % 5):
                probs, value = model(torch.randn(4))
                m = torch.distributions.Categorical(probs)
                action = m.sample()
                model.saved_actions.append((m.log_prob(action), value))
                model.rewards.append(float(action.item()))
            returns, r = [], 0.0
            for reward in model.rewards[::-1]:
                r = reward + gamma * r
                returns.insert(0, r)
            returns = torch.tensor(returns)
            returns = (returns - returns.mean()) / (returns.std() + eps)
            policy_losses, value_losses = [], []
            for (log_prob, value), ret in zip(model.saved_actions, returns):
                policy_losses.append(-log_prob * (ret - value.item()))
                value_losses.append(F.smooth_l1_loss(value, torch.tensor([ret])))
            optimizer.zero_grad()
            loss = torch.stack(policy_losses).sum() + torch.stack(value_losses).sum()
            loss.backward()
            optimizer.step()
            del model.rewards[:]
            del model.saved_actions[:]
    return prof
