import numpy as np

from img2prompt.evaluation.scores import (
    cosine_rows,
    evaluate_methods,
    fit_linear_map,
    paired_difference,
    summarize,
)
from img2prompt.evaluation.search import nearest


def test_cosines_and_nearest():
    a = np.array([[1, 0], [0, 2]], dtype=np.float32)
    assert np.allclose(cosine_rows(a, [[1, 0], [0, -1]]), [1, -1])
    assert np.allclose(cosine_rows(a, [3, 0]), [1, 0])  # one row against many
    bank = np.array([[0, 1], [1, 0.1], [-1, 0]])
    assert list(nearest(np.array([[5, 0], [0, 3], [-2, 0.1]]), bank)) == [1, 0, 2]


def test_summary_interval_contains_the_mean_and_is_seeded():
    scores = np.random.default_rng(0).uniform(0.4, 0.9, size=200)
    summary = summarize(scores, n_boot=500, seed=3)
    low, high = summary["ci95"]
    assert low < summary["mean_cosine"] < high and high - low < 0.1
    assert summary == summarize(scores, n_boot=500, seed=3)
    difference = paired_difference(scores + 0.1, scores, n_boot=100)
    assert np.isclose(difference["mean_difference"], 0.1) and np.allclose(difference["ci95"], 0.1)


def test_linear_map_recovers_a_linear_relation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6))
    w = rng.normal(size=(6, 4))
    apply = fit_linear_map(x, x @ w + 2.0, alpha=1e-6)
    z = rng.normal(size=(10, 6))
    assert np.allclose(apply(z), z @ w + 2.0, atol=1e-3)


def constructed_case():
    """Three distinct prompts: one-hot metric embeddings make every cosine easy to predict."""
    eye = np.eye(3, dtype=np.float32)
    train = {"prompts": ["p0", "p1", "p2"], "image_emb": eye * 5 + 1, "metric_emb": eye}
    test = {"ids": ["t0", "t1"], "images": ["t0.png", "t1.png"], "prompts": ["p1", "P2"],
            "image_emb": np.array([[1, 6, 1], [6, 1, 1]], dtype=np.float32),  # nearest: train 1, train 0
            "metric_emb": eye[[1, 2]], "target_emb": eye[[1, 2]]}
    bank = {"prompts": train["prompts"], "target_emb": eye, "metric_emb": eye}
    return test, train, bank


def test_every_method_scored_on_a_constructed_case():
    test, train, bank = constructed_case()
    predicted = np.array([[0.1, 1, 0], [0, 0.2, 1]], dtype=np.float32)
    frame, metrics = evaluate_methods(test, train, bank, predicted, None, n_boot=50)
    assert list(frame["predicted_prompt"]) == ["p1", "p2"]
    assert list(frame["knn_prompt"]) == ["p1", "p0"]
    assert np.allclose(frame["cosine_retrieval"], 1.0)
    assert np.allclose(frame["cosine_knn"], [1.0, 0.0])
    assert np.allclose(frame["cosine_mean_prompt"], 1 / np.sqrt(3))
    assert np.allclose(frame["cosine_mapper"], cosine_rows(predicted, test["metric_emb"]))
    methods = metrics["methods"]
    assert set(methods) == {"mapper", "retrieval", "knn", "mean_prompt"}
    assert methods["retrieval"]["exact_prompt_rate"] == 1.0  # case and spacing do not count
    assert methods["retrieval"]["bank_size"] == 3
    assert np.isclose(metrics["comparisons"]["retrieval_minus_knn"]["mean_difference"], 0.5)


def test_predictions_made_a_block_at_a_time_score_as_all_at_once(monkeypatch):
    from img2prompt.evaluation import scores
    rng = np.random.default_rng(0)
    test, train, bank = constructed_case()
    test = {**test, "ids": [f"t{i}" for i in range(10)], "images": [f"t{i}.png" for i in range(10)],
            "prompts": [f"p{i % 3}" for i in range(10)], "image_emb": rng.random((10, 3), dtype=np.float32),
            "metric_emb": np.eye(3, dtype=np.float32)[np.arange(10) % 3]}
    test["target_emb"] = test["metric_emb"]
    predicted = rng.normal(size=(10, 3)).astype(np.float32)
    whole = evaluate_methods(test, train, bank, predicted, None, n_boot=20)
    monkeypatch.setattr(scores, "QUERY_BLOCK", 4)
    asked = []
    frame, metrics = evaluate_methods(test, train, bank, lambda rows: asked.append(rows) or predicted[rows], None,
                                      n_boot=20)
    assert [(r.start, r.stop) for r in asked] == [(0, 4), (4, 8), (8, 10)]  # never all the test images at once
    assert frame.equals(whole[0]) and metrics == whole[1]


def test_other_target_space_is_mapped_into_the_metric_space():
    test, train, bank = constructed_case()
    double = lambda z: np.asarray(z) * 2  # stands for a fitted map
    predicted = np.array([[0, 1, 0], [0, 0, 1]], dtype=np.float32)
    frame, metrics = evaluate_methods(test, train, bank, predicted, double, n_boot=10)
    assert np.allclose(frame["native_cosine_mapper"], 1.0)
    assert np.isclose(metrics["methods"]["mapper"]["native_mean_cosine"], 1.0)
