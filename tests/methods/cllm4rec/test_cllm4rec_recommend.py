"""CLLM4Rec behind ``recalign recommend`` / the session API: every item scored in one forward pass."""

import json

import numpy as np
import pytest
from test_cllm4rec_cli import files  # noqa: F401  (the fixture: tiny ML-100K files + saved backbone)

from recalign.cli.main import main
from recalign.lm.recommend import RecommendSession, is_cllm4rec_run


@pytest.fixture(scope="module")
def run_dir(files, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cllm_rec") / "run"
    assert main(["cllm4rec", "pretrain", "--config", str(files), "--output", str(out)]) == 0
    assert main(["cllm4rec", "finetune", "--config", str(files), "--output", str(out)]) == 0
    return out


def test_session_scores_all_items_in_one_pass(run_dir):
    assert is_cllm4rec_run(run_dir)
    session = RecommendSession.load(run_dir)
    assert session.kind == "cllm4rec"
    hist_titles = [session.titles[0], session.titles[3]]
    recs = session.recommend(hist_titles, k=5)
    assert session.last_stats["method"] == "one-pass" and len(recs) == 5
    assert not {0, 3} & {r.item_idx for r in recs}
    # a known user: exactly the recommender's own log-probs for that user's token
    user = str(session.dataset.user_ids[2])
    logp = session.cllm.rec.log_probs(np.array([2]), [np.array([0, 3])])[0].numpy()
    known = session.recommend(hist_titles, k=5, user=user)
    order = [j for j in np.argsort(-logp, kind="stable") if j not in (0, 3)][:5]
    assert [r.item_idx for r in known] == [int(j) for j in order]
    np.testing.assert_allclose([r.score for r in known], logp[order], atol=1e-5)
    # an unknown user: the mean user embedding, a proper distribution over items
    cold = session.cllm_log_probs([0, 3])
    assert cold.shape == (session.n_items,) and np.isclose(np.exp(cold).sum(), 1.0, atol=1e-4)
    cands = session.recommend(hist_titles, candidates=[session.titles[5], session.titles[7]], k=3)
    assert {r.item_idx for r in cands} == {5, 7}
    with pytest.raises(Exception, match="unknown user 'nobody'"):
        session.recommend(hist_titles, user="nobody")


def test_cli_recommend_and_explain_a_cllm4rec_run(run_dir, capsys):
    from recalign.config import load_config
    from recalign.lm.prompts import display_titles
    from recalign.methods.cllm4rec.config import CLLM4RecConfig
    from recalign.methods.cllm4rec.pipeline import load_data

    ds, _ = load_data(load_config(CLLM4RecConfig, run_dir / "config.yaml"))
    titles = display_titles(ds)
    capsys.readouterr()
    assert (
        main(["recommend", "--model", str(run_dir), "--history", titles[1], titles[2], "-k", "4", "--json"])
        == 0
    )
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == 4 and not {titles[1], titles[2]} & {r["title"] for r in recs}
    assert (
        main(["explain", "--model", str(run_dir), "--history", titles[1], "--item", titles[4], "--json"]) == 0
    )
    assert isinstance(json.loads(capsys.readouterr().out)["explanation"], str)
