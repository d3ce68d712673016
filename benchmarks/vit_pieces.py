r"""The ViT pair's train step piece by piece, kdjax (XLA:CPU) beside PyTorch eager (timm), in one process.

Each piece runs forward and backward (gradients of the inputs and parameters against a fixed random cotangent) at
the shapes of `step_speed.py`'s resnet20 -> deit_tiny pair (batch 64, 32 px, patch 4: 65 tokens of width 192, 3
heads, MLP 768); the whole student (forward + backward of its cross-entropy), the teacher's eval forward and the
optimizer update (SGD momentum 0.9, wd 5e-4, as step_speed.py) complete the picture. The attention core is timed
twice on the kdjax side: the model's (`jax.nn.dot_product_attention`, whose XLA path vmaps over the heads of
[B, T, heads, head_dim] slices) and timm's layout written as einsums (heads moved first, q scaled first), against
the same PyTorch row (`F.scaled_dot_product_attention`). Both sides run alternately,
piece by piece, `--repeats` times; the table gives each piece's fastest time over all repeats (the least disturbed
by other work on a shared machine) and the median, in ms. PyTorch uses `torch.get_num_threads()` threads (all
cores, as step_speed.py's worker); XLA:CPU its own pool over the same cores.

  python benchmarks/vit_pieces.py --repeats=3
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_integer('repeats', 3, 'Alternating rounds over every piece.')
flags.DEFINE_integer('calls', 8, 'Timed calls per piece and round.')
FLAGS = flags.FLAGS

B, T, D, HEADS, MLP, CLASSES = 64, 65, 192, 3, 768, 100


def _time(fn, calls: int) -> list[float]:
  fn()
  out = []
  for _ in range(calls):
    t0 = time.perf_counter()
    fn()
    out.append((time.perf_counter() - t0) * 1e3)
  return out


def jax_pieces():
  import kdjax.platform  # noqa: F401  (before jax)
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from kdjax import models
  from kdjax.models import vit
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.standard_normal((B, T, D), np.float32))
  images = jnp.asarray(rng.standard_normal((B, 32, 32, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, CLASSES, B))

  def fwd_bwd(module, x, **kw):  # forward + backward of one module against a fixed cotangent
    apply = lambda v, x: module.apply(v, x, **kw)
    variables = jax.jit(lambda k, x: module.init(k, x, **kw))(jax.random.key(0), x)
    ct = jnp.asarray(rng.standard_normal(jax.eval_shape(apply, variables, x).shape, np.float32))
    f = jax.jit(lambda v, x: jax.vjp(apply, v, x)[1](ct)).lower(variables, x).compile()
    return lambda: jax.block_until_ready(f(variables, x))

  class Gelu(nn.Module):
    @nn.compact
    def __call__(self, x):
      return vit.gelu(x)  # the model's exact GELU

  class Core(nn.Module):  # the attention without its projections: qkv [B, T, 3D] -> [B, T, D]
    timm_layout: bool = False  # q, k, v moved to [B, heads, T, head_dim] first, as timm does, then two einsums

    @nn.compact
    def __call__(self, qkv):
      qkv = qkv.reshape(B, T, 3, HEADS, D // HEADS)
      if not self.timm_layout:
        return vit.attention(qkv).reshape(B, T, D)  # the model's: jax.nn.dot_product_attention
      q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))
      probs = jax.nn.softmax(jnp.einsum('bhtd,bhsd->bhts', q * (D // HEADS) ** -0.5, k), axis=-1)
      return jnp.einsum('bhts,bhsd->bthd', probs, v).reshape(B, T, D)

  student = models.create('deit_tiny', CLASSES, patch_size=4)
  teacher = models.create('resnet20', CLASSES)
  s_vars = jax.jit(student.init)(jax.random.key(0), images[:1])
  t_vars = jax.jit(teacher.init)(jax.random.key(1), images[:1])

  def loss(p, x, y):
    logits = student.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(0)}).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad = jax.jit(jax.grad(loss)).lower(s_vars['params'], images, labels).compile()
  teach = jax.jit(lambda v, x: teacher.apply(v, x, train=False).logits).lower(t_vars, images).compile()
  opt = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
  grads = grad(s_vars['params'], images, labels)
  opt_state = opt.init(s_vars['params'])
  update = jax.jit(lambda p, s, g: optax.apply_updates(p, opt.update(g, s, p)[0]), donate_argnums=(0,))
  params = {'p': jax.tree.map(jnp.copy, s_vars['params'])}

  def step_update():
    params['p'] = jax.block_until_ready(update(params['p'], opt_state, grads))

  return {
      'LayerNorm [64,65,192]': fwd_bwd(nn.LayerNorm(epsilon=1e-6), tokens),
      'GELU (erf) [64,65,768]': fwd_bwd(Gelu(), jnp.concatenate([tokens] * 4, -1)),
      'attention core (3 heads, 65 tokens)': fwd_bwd(Core(), jnp.concatenate([tokens] * 3, -1)),
      'attention core, heads-first einsums': fwd_bwd(Core(timm_layout=True), jnp.concatenate([tokens] * 3, -1)),
      'Linear 192->768': fwd_bwd(nn.Dense(MLP), tokens),
      'Linear 768->192': fwd_bwd(nn.Dense(D), jnp.concatenate([tokens] * 4, -1)),
      'patch embedding (conv 4x4/4)': fwd_bwd(vit.PatchEmbed(D, 4), images),
      'one block': fwd_bwd(vit.Block(HEADS), tokens, train=True),
      'student forward + backward': lambda: jax.block_until_ready(grad(s_vars['params'], images, labels)),
      'teacher forward (eval)': lambda: jax.block_until_ready(teach(t_vars, images)),
      'SGD update (5.4M parameters)': step_update,
  }


def torch_pieces():
  import timm  # a test extra (requirements-test.txt)
  import torch
  from timm.models import vision_transformer as tv
  from kdjax.tools import torch_reference as ref
  torch.manual_seed(0)
  tokens = torch.randn(B, T, D)
  images = torch.randn(B, 3, 32, 32)
  labels = torch.randint(0, CLASSES, (B,))

  def fwd_bwd(module, x):
    x = x.clone().requires_grad_(True)
    ct = torch.randn_like(module(x))

    def run():
      module.zero_grad(set_to_none=True)
      x.grad = None
      module(x).backward(ct)
    return run

  class Core(torch.nn.Module):  # timm's Attention between its qkv and proj Linear layers
    def forward(self, qkv):
      q, k, v = qkv.reshape(B, T, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
      return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)

  student = timm.create_model('deit_tiny_patch16_224', pretrained=False, img_size=32, num_classes=CLASSES,
                              patch_size=4).train()
  teacher = ref.CifarResNet(20, (16, 16, 32, 64), CLASSES).eval()
  opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

  def student_step():
    student.zero_grad(set_to_none=False)
    torch.nn.functional.cross_entropy(student(images), labels).backward()

  student_step()
  opt.step()  # the momentum buffers exist

  def teach():
    with torch.no_grad():
      teacher(images)

  return {
      'LayerNorm [64,65,192]': fwd_bwd(torch.nn.LayerNorm(D, eps=1e-6), tokens),
      'GELU (erf) [64,65,768]': fwd_bwd(torch.nn.GELU(), torch.cat([tokens] * 4, -1)),
      'attention core (3 heads, 65 tokens)': fwd_bwd(Core(), torch.cat([tokens] * 3, -1)),
      'attention core, heads-first einsums': fwd_bwd(Core(), torch.cat([tokens] * 3, -1)),
      'Linear 192->768': fwd_bwd(torch.nn.Linear(D, MLP), tokens),
      'Linear 768->192': fwd_bwd(torch.nn.Linear(MLP, D), torch.cat([tokens] * 4, -1)),
      'patch embedding (conv 4x4/4)': fwd_bwd(student.patch_embed, images),
      'one block': fwd_bwd(tv.Block(D, HEADS, qkv_bias=True), tokens),
      'student forward + backward': student_step,
      'teacher forward (eval)': teach,
      'SGD update (5.4M parameters)': opt.step,
  }


def main(argv):
  del argv
  import torch
  sides = {'kdjax': jax_pieces(), 'PyTorch': torch_pieces()}
  times = {side: {name: [] for name in pieces} for side, pieces in sides.items()}
  for rep in range(FLAGS.repeats):
    for name in sides['kdjax']:
      for side, pieces in sides.items():
        times[side][name] += _time(pieces[name], FLAGS.calls)
    print(f'round {rep + 1} done, load average {os.getloadavg()[0]:.2f}', flush=True)
  print(f'\n{os.cpu_count()} CPU cores, PyTorch {torch.__version__} with {torch.get_num_threads()} threads; '
        'ms: fastest (median) over all calls')
  print('\n| piece (forward + backward unless said) | kdjax | PyTorch eager | kdjax / PyTorch (fastest) |')
  print('|---|---|---|---|')
  for name in sides['kdjax']:
    j, p = times['kdjax'][name], times['PyTorch'][name]
    print(f'| {name} | {min(j):.2f} ({statistics.median(j):.2f}) | {min(p):.2f} ({statistics.median(p):.2f}) | '
          f'{min(j) / min(p):.2f} |')


if __name__ == '__main__':
  app.run(main)
