from prunecli.core.checkpoint import Checkpoint


def test_fixtures_build(gpt2_dir, llama_sharded_bf16_dir):
    g = Checkpoint(gpt2_dir)
    assert g.layout("transformer.h.0.mlp.c_proj.weight") == "in_out"
    assert g.resolve("lm_head.weight") in g.names()
    s = Checkpoint(llama_sharded_bf16_dir)
    assert len(s._files) > 1
    assert s.info("model.layers.0.mlp.down_proj.weight").dtype == "BF16"
