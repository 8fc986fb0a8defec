"""``mmorepa.cli``: library errors as one line and exit status 1, a bug keeps its traceback; the
Runner's model holds the checkpoint given to ``build_runner`` (fused where asked) through a test
run, whatever the config's ``load_from`` says."""
import pytest
import torch

import mmorepa
from helpers import rel_err
from mmorepa import cli
from mmorepa.errors import CheckpointError, ConfigError
from mmorepa.layers import ReparamConv2d


@pytest.mark.parametrize('error', [CheckpointError('checkpoint x.pth\nis bad'),
                                   ConfigError('bad config'), cli.ToolError('bad argument'),
                                   FileNotFoundError('no such file: y')])
def test_run_tool_prints_expected_failures_in_one_line(error, capsys):
    def main(argv):
        raise error
    with pytest.raises(SystemExit) as e:
        cli.run_tool(main, [])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'error: ' in err
    assert ' '.join(str(error).splitlines()) in err


def test_argument_parser_usage_errors_are_tool_errors(capsys):
    parser = cli.ArgumentParser(prog='tool')
    parser.add_argument('count', type=int)
    with pytest.raises(cli.ToolError, match="invalid int value: 'many'"):
        parser.parse_args(['many'])
    with pytest.raises(cli.ToolError, match='unrecognized arguments: --bogus'):
        parser.parse_args(['1', '--bogus'])
    assert capsys.readouterr().err == ''  # no usage text
    with pytest.raises(SystemExit) as e:
        parser.parse_args(['--help'])
    assert e.value.code == 0 and 'usage: tool' in capsys.readouterr().out


def test_run_tool_keeps_the_traceback_of_a_bug():
    def main(argv):
        raise KeyError('a bug')
    with pytest.raises(KeyError):
        cli.run_tool(main, [])


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_build_runner_loads_the_checkpoint_and_nothing_over_it(tiny_cfg, tiny_ckpt, tmp_path):
    other = tmp_path / 'other.pth'
    weights = torch.load(tiny_ckpt, weights_only=True)['state_dict']
    torch.save(dict(state_dict={k: v + 1 if v.is_floating_point() else v
                                for k, v in weights.items()}), other)
    cfg = cli.load_config(tiny_cfg, work_dir=str(tmp_path / 'w'),
                          cfg_options={'load_from': str(other)})
    runner = cli.build_runner(cfg, tiny_ckpt)
    model = cli.runner_model(runner)
    runner.test()
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], weights[k]) for k in weights)  # not other.pth's
    assert cfg.load_from == str(other)  # the caller's config is left as it was


def test_build_runner_fuses_after_loading(tiny_cfg, tiny_ckpt, tiny_model, tmp_path):
    cfg = cli.load_config(tiny_cfg, work_dir=str(tmp_path / 'w'))
    runner = cli.build_runner(cfg, tiny_ckpt, fuse=True)
    model = cli.runner_model(runner)
    runner.test()
    assert any(isinstance(m, ReparamConv2d) for m in tiny_model.modules())
    assert not any(isinstance(m, ReparamConv2d) for m in model.modules())  # plain convs
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), mmorepa.unfused_eval(tiny_model):
        assert rel_err(model.eval()(x, mode='tensor'), tiny_model(x, mode='tensor')) <= 1e-5
