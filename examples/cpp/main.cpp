// torch-nystrom from C++, with no Python at run time.
//
//   nystrom_example [ARCHIVE.pt] [--aoti PACKAGE.pt2 CASES.pt]
//
// (a) With ARCHIVE: load a TorchScript archive saved by Python
//     (torch.jit.save) that holds a container module with the attributes
//       model     a scripted module that calls torch.ops.nystrom.*
//       input     Tensor (B, L, E)
//       mask      bool Tensor (B, L), true = padding (may be all false)
//       expected  Tensor, what Python computed for model(input, mask)
//     run model.forward(input, mask) here and compare with `expected`.
// (c) With --aoti: run an AOTInductor package (torch._inductor.aoti_compile_and_package
//     of a torch.export-ed model that calls torch.ops.nystrom.*) through
//     torch::inductor::AOTIModelPackageLoader. CASES.pt, saved by Python's
//     torch.save, is a dict {"cases": [(input, mask, expected), ...]}: for each
//     case the package runs on (input, mask) and must give `expected`.
//     The ops the package calls are found because this program links
//     TorchNystrom::nystrom, which registers them.
// (b) Always: train the C++ layer nystrom::NystromAttention with a small
//     regression head for a few Adam steps on a fixed synthetic task with
//     padded sequences of length 50; the loss must go down.
//
// Exit status 0 only if every part run passes.

#include <nystrom/nystrom.h>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// ------------------------------------------------ (a) TorchScript model -----

// out against expected: same shape and dtype, allclose(rtol=1e-5, atol=1e-6).
bool matches(const at::Tensor& out, const at::Tensor& expected) {
  if (out.sizes() != expected.sizes() || out.scalar_type() != expected.scalar_type()) {
    std::cout << "  MISMATCH: output " << out.sizes() << " " << out.scalar_type() << ", expected "
              << expected.sizes() << " " << expected.scalar_type() << "\n";
    return false;
  }
  const double max_diff =
      out.numel() ? (out.to(torch::kFloat64) - expected.to(torch::kFloat64)).abs().max().item<double>()
                  : 0.0;
  const bool ok = torch::allclose(out, expected, /*rtol=*/1e-5, /*atol=*/1e-6);
  std::cout << "  max abs difference to Python: " << max_diff << (ok ? "  (ok)" : "  MISMATCH")
            << "\n";
  return ok;
}

bool run_torchscript_archive(const std::string& path) {
  torch::jit::Module container = torch::jit::load(path);
  torch::jit::Module model = container.attr("model").toModule();
  const at::Tensor input = container.attr("input").toTensor();
  const at::Tensor mask = container.attr("mask").toTensor();
  const at::Tensor expected = container.attr("expected").toTensor();
  model.eval();

  torch::NoGradGuard no_grad;
  torch::jit::Method forward = model.get_method("forward");
  const at::Tensor out = forward({input, mask}).toTensor();

  std::cout << "[torchscript] " << path << "\n"
            << "  input " << input.sizes() << " " << input.scalar_type() << ", padded tokens "
            << mask.sum().item<int64_t>() << ", output " << out.sizes() << "\n";
  return matches(out, expected);
}

// ------------------------------------------------ (c) AOTInductor package -----

bool run_aoti_package(const std::string& package, const std::string& cases_path) {
  std::ifstream file(cases_path, std::ios::binary);
  if (!file) {
    throw std::runtime_error("cannot read " + cases_path);
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const c10::impl::GenericList cases = torch::pickle_load(bytes).toGenericDict().at("cases").toList();

  torch::inductor::AOTIModelPackageLoader loader(package);
  torch::NoGradGuard no_grad;
  std::cout << "[aoti] " << package << ", " << cases.size() << " case(s)\n";
  bool ok = !cases.empty();
  for (const c10::IValue& item : cases) {
    const auto& fields = item.toTupleRef().elements();
    if (fields.size() != 3) {
      throw std::runtime_error(cases_path + ": each case must be (input, mask, expected)");
    }
    const at::Tensor input = fields[0].toTensor();
    const at::Tensor mask = fields[1].toTensor();
    const at::Tensor expected = fields[2].toTensor();
    const std::vector<at::Tensor> outs = loader.run({input, mask});
    std::cout << "  input " << input.sizes() << ", padded tokens " << mask.sum().item<int64_t>()
              << ", outputs " << outs.size() << "\n";
    ok = !outs.empty() && matches(outs[0], expected) && ok;
  }
  return ok;
}

// ------------------------------------------------- (b) training in C++ -----

// Nyström self-attention layer with a residual connection and a linear head
// that predicts one number per token.
struct RegressorImpl : torch::nn::Module {
  RegressorImpl()
      : attn(register_module(
            "attn", nystrom::NystromAttention(nystrom::NystromAttentionOptions(32, 4).num_landmarks(8)))),
        head(register_module("head", torch::nn::Linear(32, 1))) {}

  at::Tensor forward(const at::Tensor& x, const at::Tensor& key_padding_mask) {
    const at::Tensor h = x + attn(x, key_padding_mask);
    return head(h).squeeze(-1);
  }

  nystrom::NystromAttention attn;
  torch::nn::Linear head;
};
TORCH_MODULE(Regressor);

bool train_cpp_layer() {
  constexpr int64_t kBatch = 8, kLength = 50, kEmbed = 32, kSteps = 25;
  torch::manual_seed(0);

  // Fixed synthetic task. Sequence b has lengths[b] real tokens, the rest is
  // padding. The target of token t mixes a per-token term with the mean of
  // a projection over the real tokens of its sequence, so the model needs
  // the attention (global context), and padding must not leak into it.
  const std::vector<int64_t> lengths{50, 47, 44, 41, 38, 35, 31, 26};
  const at::Tensor x = torch::randn({kBatch, kLength, kEmbed});
  const at::Tensor mask = torch::arange(kLength).unsqueeze(0) >=
                          torch::tensor(lengths).unsqueeze(1);  // (B, L), true = padding
  const at::Tensor real = mask.logical_not().to(torch::kFloat32);
  const at::Tensor w_local = torch::randn({kEmbed}) / std::sqrt(static_cast<double>(kEmbed));
  const at::Tensor w_global = torch::randn({kEmbed}) / std::sqrt(static_cast<double>(kEmbed));
  const at::Tensor context =
      (x.matmul(w_global) * real).sum(1, /*keepdim=*/true) / real.sum(1, /*keepdim=*/true);
  const at::Tensor target = (torch::tanh(x.matmul(w_local)) + 3.0 * context) * real;

  Regressor model;
  model->train();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));

  double first = 0.0, last = 0.0;
  std::cout << "[training] NystromAttention(32, 4, num_landmarks=8) + Linear(32, 1), batch "
            << kBatch << ", length " << kLength << ", padded tokens "
            << mask.sum().item<int64_t>() << "\n";
  for (int64_t step = 0; step < kSteps; ++step) {
    optimizer.zero_grad();
    const at::Tensor pred = model(x, mask);
    const at::Tensor loss = ((pred - target).pow(2) * real).sum() / real.sum();
    loss.backward();
    optimizer.step();
    const double value = loss.item<double>();
    if (!std::isfinite(value)) {
      std::cout << "  step " << step << ": loss is not finite\n";
      return false;
    }
    if (step == 0) {
      first = value;
    }
    last = value;
    std::printf("  step %2lld  loss %.6f\n", static_cast<long long>(step), value);
  }
  const bool ok = last < first;
  std::cout << "  first loss " << first << ", final loss " << last
            << (ok ? "  (decreased)" : "  FAILED: the loss did not decrease") << "\n";
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string usage = std::string("usage: ") + argv[0] + " [ARCHIVE.pt] [--aoti PACKAGE.pt2 CASES.pt]";
  std::string archive, package, cases;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--aoti" && i + 2 < argc) {
      package = argv[++i];
      cases = argv[++i];
    } else if (arg.rfind("-", 0) != 0 && archive.empty()) {
      archive = arg;
    } else {
      std::cerr << usage << std::endl;
      return 2;
    }
  }
  try {
    bool ok = true;
    if (!archive.empty()) {
      ok = run_torchscript_archive(archive) && ok;
    } else {
      std::cout << "[torchscript] skipped (no archive given; " << usage << ")\n";
    }
    if (!package.empty()) {
      ok = run_aoti_package(package, cases) && ok;
    } else {
      std::cout << "[aoti] skipped (no --aoti PACKAGE.pt2 CASES.pt)\n";
    }
    ok = train_cpp_layer() && ok;
    std::cout << (ok ? "OK" : "FAILED") << std::endl;
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 2;
  }
}
