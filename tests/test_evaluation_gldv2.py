"""GLDv2 mAP@100 and GAP with hand-computed fixtures; CSV readers."""

import pytest

from delg_tf.evaluation import gldv2


def test_ap_at_k_hand_computed():
    # relevant {a, b, c}; hits at ranks 1 and 3 -> (1/1 + 2/3) / 3.
    assert gldv2.average_precision_at_k(["a", "x", "b"], ["a", "b", "c"]) == pytest.approx(
        (1 + 2 / 3) / 3
    )
    # duplicates are skipped but keep their rank: hit at rank 3 -> (1/3) / 1.
    assert gldv2.average_precision_at_k(["x", "x", "a", "a"], ["a"]) == pytest.approx(1 / 3)
    # only the first k predictions count; normaliser min(m, k).
    assert gldv2.average_precision_at_k(["x", "a"], ["a"], max_predictions=1) == 0.0
    assert gldv2.average_precision_at_k(
        ["a", "b"], ["a", "b", "c"], max_predictions=2
    ) == pytest.approx(1.0)


def test_map_counts_queries_without_predictions_as_zero():
    solution = {"q1": ["a"], "q2": ["b"]}
    assert gldv2.mean_average_precision({"q1": ["a"]}, solution) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not part"):
        gldv2.mean_average_precision({"zz": ["a"]}, solution)


def test_gap_hand_computed():
    solution = {"a": [1], "b": [2], "c": [], "d": [4]}
    preds = {
        "a": {"class": 1, "score": 0.9},  # correct, 1/1
        "c": {"class": 3, "score": 0.8},  # non-landmark: wrong
        "b": {"class": 2, "score": 0.7},  # correct, 2/3
        "d": {"class": 5, "score": 0.6},
    }  # wrong
    assert gldv2.global_average_precision(preds, solution) == pytest.approx((1 + 2 / 3) / 3)
    assert gldv2.global_average_precision(
        preds, solution, ignore_non_gt_test_images=True
    ) == pytest.approx((1 + 2 / 2) / 3)


def test_gap_ties_sorted_by_id():
    solution = {"a": [1], "b": [2]}
    preds = {"b": {"class": 2, "score": 0.5}, "a": {"class": 9, "score": 0.5}}
    # tie -> "a" (wrong) first, then "b" correct at 2: (1/2) / 2.
    assert gldv2.global_average_precision(preds, solution) == pytest.approx(0.25)


def test_csv_readers_and_end_to_end(tmp_path):
    sol = tmp_path / "retrieval_solution_v2.1.csv"
    sol.write_text("id,images,Usage\nq1,a b,Public\nq2,c,Private\nq3,None,Ignored\n")
    pred = tmp_path / "pred.csv"
    pred.write_text("id,images\nq1,a x b\nq2,y c\nq3,a\n")
    out = gldv2.evaluate_retrieval_csv(sol, pred)
    assert out["public"]["mAP@100"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["private"]["mAP@100"] == pytest.approx(50.0)

    rsol = tmp_path / "recognition_solution_v2.1.csv"
    rsol.write_text("id,landmarks,Usage\nt1,7,Public\nt2,,Public\nt3,8 9,Private\n")
    rpred = tmp_path / "rpred.csv"
    rpred.write_text("id,landmarks\nt1,7 0.9\nt2,3 0.5\nt3,9 0.4\n")
    out = gldv2.evaluate_recognition_csv(rsol, rpred)
    assert out["public"]["GAP"] == pytest.approx(100.0)
    assert out["private"]["GAP"] == pytest.approx(100.0)


def test_csv_format_errors(tmp_path):
    bad = tmp_path / "s.csv"
    bad.write_text("id,landmarks,Usage\nq1,a,Public\n")
    with pytest.raises(gldv2.Gldv2FormatError, match="header"):
        gldv2.read_solution(bad, "retrieval")
    with pytest.raises(gldv2.Gldv2FormatError, match="integers"):
        gldv2.read_solution(bad, "recognition")
    bad.write_text("id,images,Usage\nq1,a,Secret\n")
    with pytest.raises(gldv2.Gldv2FormatError, match="Usage"):
        gldv2.read_solution(bad, "retrieval")
    bad.write_text("id,images,Usage\nq1,a,Public\n")
    sol = gldv2.read_solution(bad, "retrieval")
    pred = tmp_path / "p.csv"
    pred.write_text("id,images\nq1,a\nq1,b\n")
    with pytest.raises(gldv2.Gldv2FormatError, match="repeated"):
        gldv2.read_predictions(pred, "retrieval", sol)
