"""The family map: one home for "family -> module and parameters", used by checkpoints
and objectives alike; a heads workdir restores without its target; no import circle."""
import ast
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from configs import ar_lm, eagle, eagle3, medusa, mtp, tidar
from models import EagleDrafter, MedusaHeads, TidarLM, Transformer, families
from training import checkpoints, objectives, tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 259  # the byte tokenizer's


def _imported_modules(path: str) -> set:
  names = set()
  for node in ast.walk(ast.parse(open(os.path.join(REPO, path)).read())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def test_no_import_circle():
  assert not any('objectives' in name for name in _imported_modules('training/checkpoints.py'))
  assert not any(name.split('.')[0] in ('training', 'configs', 'decoding', 'launch')
                 for name in _imported_modules('models/families.py'))
  code = ('import sys, training.checkpoints; '
          'assert "training.objectives" not in sys.modules, "checkpoints imported objectives"')
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]


def _shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def test_the_objectives_train_the_modules_of_the_family_map():
  for config, module_type in ((ar_lm.get_config('size=tiny'), Transformer),
                              (mtp.get_config('size=tiny,heads=3'), Transformer),
                              (tidar.get_config('size=tiny,block=4'), TidarLM)):
    objective = objectives.build(config, VOCAB)
    assert objective.model == families.build_module(config, VOCAB)
    assert isinstance(objective.model, module_type)
    assert _shapes(families.abstract_params(config, VOCAB)) == _shapes(nn.meta.unbox(
        jax.eval_shape(objective.init, jax.random.PRNGKey(0), objective.example_batch())))
  # The heads families, on a target of their config's model (not restored: none is needed).
  for config in (medusa.get_config('size=tiny,num_heads=2,joint=false'),
                 medusa.get_config('size=tiny,num_heads=2,joint=true'),
                 eagle.get_config('size=tiny'), eagle3.get_config('size=tiny')):
    target = Transformer(families.transformer_config(config, VOCAB))
    if config.family == 'medusa':
      objective = objectives.MedusaObjective(target.config, 2, target, None,
                                             joint=config.medusa.joint)
    elif config.family == 'eagle3':
      objective = objectives.Eagle3Objective(target.config, target, None,
                                             config.eagle3.feature_layers)
    else:
      objective = objectives.EagleObjective(target.config, target, None)
    assert objective.model == families.build_module(config, VOCAB)
    joint = config.family == 'medusa' and config.medusa.joint
    assert families.base_module(config, VOCAB) == (target if joint else None)
    assert _shapes(families.abstract_params(config, VOCAB)) == _shapes(nn.meta.unbox(
        jax.eval_shape(objective.init, jax.random.PRNGKey(0), objective.example_batch())))


@pytest.mark.parametrize('family', ['medusa', 'eagle'])
def test_a_heads_workdir_restores_without_its_target(family, tmp_path, monkeypatch):
  """Medusa-2 (params {'heads', 'base'}) and EAGLE: the checkpoint is checked against its
  config.json from the family map alone; the target workdir is never read."""
  config = (medusa.get_config('size=tiny,num_heads=2,joint=true') if family == 'medusa'
            else eagle.get_config('size=tiny'))
  config.target_workdir = str(tmp_path / 'no_such_target')
  workdir = str(tmp_path / family)
  checkpoints.check_and_save_config(workdir, config)
  tokenizers.ByteTokenizer().save(workdir)
  module, base = families.build_module(config, VOCAB), families.base_module(config, VOCAB)
  params = nn.meta.unbox(families.init_params(module, jax.random.PRNGKey(0),
                                              families.example_batch(), base))
  checkpoints.save_params(workdir, params)

  restore_model, restored_dirs = checkpoints.restore_model, []
  def spy(path, *args, **kwargs):
    restored_dirs.append(path)
    return restore_model(path, *args, **kwargs)
  monkeypatch.setattr(checkpoints, 'restore_model', spy)
  restored = checkpoints.restore_model(workdir)
  assert restored_dirs == [workdir]
  assert restored.model == module and restored.step == 0 and restored.workdir == workdir
  if family == 'medusa':
    assert isinstance(restored.model, MedusaHeads) and restored.model.num_heads == 2
    assert set(restored.params) == {'heads', 'base'}
  else:
    assert isinstance(restored.model, EagleDrafter)

  # The shape check against config.json still holds.
  with open(os.path.join(workdir, checkpoints.CONFIG_FILE)) as f:
    saved = json.load(f)
  saved['model']['d_model'] = 32
  with open(os.path.join(workdir, checkpoints.CONFIG_FILE), 'w') as f:
    json.dump(saved, f)
  with pytest.raises(checkpoints.ConfigMismatchError, match='does not match its config.json'):
    checkpoints.restore_model(workdir)
