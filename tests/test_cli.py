"""The `relucap` command line: entry point, smoke command, argument errors."""

import subprocess
import sys

import pytest

from relucap_plugin.cli import main


def test_info_lists_versions_and_activations(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "relucap-plugin" in out and "torch" in out
    assert "capped_relu(cap=6)" in out and "pssilu" in out
    assert "[0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: relucap" in capsys.readouterr().out


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "relucap_plugin.cli", "--version"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "relucap-plugin" in done.stdout


# --- scripts and CI (issue 17) -----------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402


def _evaluate(tmp_path, *extra):
    return main(["evaluate", "mlp:16", "--attack", "torch:FGSM", "--n-samples", "8", "--batch-size", "8",
                 "--out", str(tmp_path / "out"), *extra])


def test_help_does_not_import_torch():
    code = ("import sys; from relucap_plugin.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "evaluate" in done.stdout and done.stdout.strip().endswith("no torch")


def test_evaluate_json_is_the_only_stdout_and_eps_fractions_are_kept(tmp_path, capsys):
    assert _evaluate(tmp_path, "--eps", "8/255", "0.1", "--json") == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["command"] == "evaluate" and payload["threat_model"]["eps"] == [8 / 255, 0.1]
    assert {s["attack"] for s in payload["summary"]} == {"torch:FGSM"}
    assert [w["eps"] for w in payload["worst_case"]] == [8 / 255, 0.1]
    assert "results written to" in captured.err and "no --checkpoint" in captured.err
    table = (tmp_path / "out" / "results.txt").read_text()
    assert "8/255" in table and "0.1" in table


def test_evaluate_markdown_format(tmp_path, capsys):
    assert _evaluate(tmp_path, "--eps", "0.1", "--format", "md", "--quiet") == 0
    out = capsys.readouterr().out
    assert "| attack | eps |" in out.replace("  ", " ") and "torch:FGSM" in out


def test_evaluate_prints_the_table_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert _evaluate(tmp_path, "--eps", "0.1", "--quiet") == 0
    captured = capsys.readouterr()
    assert "torch:FGSM" in captured.out and "robust acc" in captured.out
    assert "no plot: matplotlib is not installed" in captured.err
    assert not (tmp_path / "out" / "robust_accuracy.png").exists() and (tmp_path / "out" / "results.md").exists()


def test_cli_errors_name_flags_and_leave_no_empty_out_folder(tmp_path, capsys):
    assert _evaluate(tmp_path, "--eps", "0.1", "--step-size", "-1", "--quiet") == 2
    assert "relucap evaluate: error: --step-size: step_size must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["evaluate", "mlp:16", "--attack", "torch:Nope", "--eps", "0.1", "--n-samples", "4",
                 "--quiet", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert _evaluate(tmp_path, "--eps", "0.1", "--quiet") == 0
    assert _evaluate(tmp_path, "--eps", "0.1", "--quiet", "--seed", "1") == 2  # another run in --out
    err = capsys.readouterr().err
    assert "pass --no-resume to start over" in err and "another --out folder" in err
    assert "resume=False" not in err and "out= path" not in err
    assert (tmp_path / "out" / "results.jsonl").exists()


def test_foolbox_run_leaves_os_environ_alone(tmp_path):
    code = ("import os, sys; from relucap_plugin.cli import main\n"
            f"rc = main(['evaluate', 'mlp:16', '--attack', 'foolbox:PGD', '--eps', '0.1', '--n-samples', '4',"
            f" '--quiet', '--json', '--out', {str(tmp_path / 'o')!r}])\n"
            "print(rc, 'GIT_PYTHON_REFRESH' in os.environ, file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "GIT_PYTHON_REFRESH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stderr.strip().endswith("0 False"), done.stderr[-2000:]
    assert json.loads(done.stdout)["summary"][0]["attack"] == "foolbox:LinfPGD"


def test_audit_json_and_fail_on_masking(capped_mlp, tmp_path, capsys):
    """--fail-on risk gates on risk factors (saturated caps), --fail-on masking only on a measured
    gap: at eps 0.3 every attack breaks the 20 digits, so nothing is measured and masking passes."""
    from relucap_plugin.training import save_checkpoint

    ckpt = save_checkpoint(capped_mlp, tmp_path / "capped.safetensors")
    argv = ["audit", "mlp:256,32,256:capped_relu(cap=0.1)", "--checkpoint", str(ckpt), "--eps", "0.3",
            "--n-samples", "20", "--steps", "10", "--square-queries", "100", "--quiet", "--json",
            "--out", str(tmp_path / "audit")]
    code = main([*argv, "--fail-on", "risk"])
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["level"] == "risk factors only" and payload["masking_likely"] is False and code == 1
    assert "--fail-on risk: " in captured.err and "risk factors only" in payload["verdict"]
    fired = [f["name"] for f in payload["flags"] if f["fired"]]
    assert "saturated_caps" in fired
    assert all(name in (tmp_path / "audit" / "audit.txt").read_text() for name in fired)
    assert main([*argv, "--fail-on", "masking"]) == 0
    assert json.loads(capsys.readouterr().out)["level"] == "risk factors only"


def test_capped_checkpoint_into_a_plain_model_is_refused_or_restored(capped_mlp, tmp_path, capsys):
    from relucap_plugin.training import save_checkpoint

    ckpt = str(save_checkpoint(capped_mlp, tmp_path / "capped.safetensors"))
    argv = ["evaluate", "mlp:256,32,256", "--checkpoint", ckpt, "--attack", "torch:FGSM", "--eps", "0.1",
            "--n-samples", "40", "--quiet", "--json", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "saved from a model with caps this model lacks" in err and "pass --restore-caps" in err
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--restore-caps"]) == 0
    assert json.loads(capsys.readouterr().out)["clean_accuracy"] > 0.8


def test_python_m_relucap_plugin_runs_the_cli():
    """``python -m relucap_plugin`` is the ``relucap`` command (relucap_plugin/__main__.py)."""
    import relucap_plugin

    done = subprocess.run([sys.executable, "-m", "relucap_plugin", "inspect", "mlp:16,8"],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(relucap_plugin.__file__)))
    assert done.returncode == 0, done.stderr
    assert "mlp:16,8: 2 ReLU sites" in done.stdout
