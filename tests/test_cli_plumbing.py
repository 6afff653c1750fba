from prunecli.core.checkpoint import Checkpoint


def test_fixtures_build(gpt2_dir, llama_sharded_bf16_dir):
    g = Checkpoint(gpt2_dir)
    assert g.layout("transformer.h.0.mlp.c_proj.weight") == "in_out"
    assert g.resolve("lm_head.weight") in g.names()
    s = Checkpoint(llama_sharded_bf16_dir)
    assert len(s._files) > 1
    assert s.info("model.layers.0.mlp.down_proj.weight").dtype == "BF16"


def test_usage_errors_raised_in_a_command_body_exit_2():
    """Typer vendors its own Click: run_guarded() must let its BadParameter through so the exit code stays 2."""
    import typer
    from typer.testing import CliRunner

    from prunecli.commands._errors import run_guarded

    app = typer.Typer()

    @app.command()
    def main(x: int = 0) -> None:
        def body() -> None:
            raise typer.BadParameter("x is bad", param_hint="--x")

        run_guarded(False, body)

    assert CliRunner().invoke(app, []).exit_code == 2


def test_threads_are_set_once_at_the_cli_boundary(gpt2_dir, monkeypatch):
    """`prunecli --threads N` (or PRUNECLI_THREADS) sets torch's thread count for the command; nothing below the CLI
    changes it (issue 12: library code must not flip the process-wide count behind the caller's back)."""
    import torch
    from typer.testing import CliRunner

    from prunecli.cli import app

    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    result = CliRunner().invoke(app, ["--threads", "3", "inspect", str(gpt2_dir), "--json"])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("PRUNECLI_THREADS", "2")
    assert CliRunner().invoke(app, ["inspect", str(gpt2_dir), "--json"]).exit_code == 0
    assert seen == [3, 2] and torch.get_num_threads() == before
    assert CliRunner().invoke(app, ["--threads", "0", "inspect", str(gpt2_dir)]).exit_code == 2
