"""The 8-simulated-device half of every "8 devices give the result of one" test."""
import jax

from decoding import driver
from models import sharding


def generate_on_mesh(model, params, prompts, config, drafter=None, drafter_params=None,
                     rng=None, generate=driver.generate):
  """Decodes `prompts` (lists of token ids) with `generate` on a mesh of every device
  (data x model, model_parallelism 2): parameters placed by their logical axes
  (quantized weights too), rows sharded over the data axis. Returns its Output."""
  mesh = sharding.make_mesh(model_parallelism=2)
  padded, lengths = driver.pad_prompts(prompts)
  place = lambda m, p: jax.device_put(p, sharding.param_shardings(m, mesh, params=p))
  extra = () if drafter is None else (drafter, place(drafter, drafter_params))
  with jax.set_mesh(mesh):
    return generate(model, place(model, params),
                    jax.device_put(padded, sharding.batch_sharding(mesh, 2)),
                    jax.device_put(lengths, sharding.batch_sharding(mesh, 1)), config,
                    jax.random.PRNGKey(0) if rng is None else rng, *extra)
