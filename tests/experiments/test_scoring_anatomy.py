"""experiments/scoring_anatomy.py: the stripped variants swap names in the scoring kernel's module and
put them back; the script refuses to run without a GPU (it times a Mosaic GPU kernel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture
def anatomy(experiment):
    return experiment("scoring_anatomy")


@pytest.mark.parametrize("variant", ["default", "no_exp2", "no_wgmma", "neither", "no_copies"])
def test_stripped_variants_swap_exp2_and_wgmma_then_restore_them(anatomy, variant):
    module, streamer = anatomy.selection_mgpu_keys, anatomy.selection_mgpu
    jnp_before, plgpu_before, streamer_plgpu = module.jnp, module.plgpu, streamer.plgpu
    x = jnp.array([0.0, 1.0, 3.0])
    with anatomy._stripped(variant):
        exp2_stripped = variant in ("no_exp2", "neither")
        np.testing.assert_array_equal(module.jnp.exp2(x), x if exp2_stripped else jnp.exp2(x))
        assert (module.plgpu.wgmma is plgpu_before.wgmma) == (variant not in ("no_wgmma", "neither"))
        # Everything else still comes from the real modules.
        assert module.jnp.float32 is jnp.float32 and module.plgpu.kernel is plgpu_before.kernel
        # no_copies: the key stream's copies become arrivals; the queries' copies stay.
        copies_kept = streamer.plgpu.copy_gmem_to_smem is streamer_plgpu.copy_gmem_to_smem
        assert copies_kept == (variant != "no_copies")
        assert module.plgpu.copy_gmem_to_smem is plgpu_before.copy_gmem_to_smem
    assert module.jnp is jnp_before and module.plgpu is plgpu_before and streamer.plgpu is streamer_plgpu


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal on a machine without a GPU")
def test_main_refuses_to_run_without_a_gpu(anatomy, tmp_path):
    with pytest.raises(SystemExit, match="needs a Hopper GPU"):
        anatomy.main(["--out", str(tmp_path)])
