"""The one counting routine behind compare / check_onnx / check_qonnx, on values worked by hand."""

import numpy as np
import torch

from hwquant.export.tally import Tally, labelled_batches


def test_tally_counts_codes_and_predictions_by_hand():
    t = Tally()
    t.codes("a", np.array([1, 2, 3]), torch.tensor([1, 2, 3]))
    t.codes("b", torch.tensor([[0, 5], [7, 1]]), np.array([[0, 2], [7, 2]]))  # two differ: by 3 and by 1
    t.codes("a", [4], [4])
    assert t.layers == {"a": {"codes": 4, "codes_diff": 0, "max_lsb": 0},
                        "b": {"codes": 4, "codes_diff": 2, "max_lsb": 3}}
    assert t.totals() == {"codes": 8, "codes_diff": 2, "max_code_lsb": 3, "first_diff": "b"}
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # predicts 0, 1, 0
    other = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # predicts 0, 0, 0
    t.predictions(ref, other, torch.tensor([0, 1, 1]))
    assert t.top1("reference") == 200 / 3 and t.top1("other") == 100 / 3 and t.prediction_agree == 200 / 3
    t.predictions(ref, ref, None)  # unlabelled: agreement only
    assert t.images == 3 and t.prediction_agree == 500 / 6


def test_labelled_batches_forms():
    x, y = torch.zeros(2, 1), torch.ones(2)
    got = list(labelled_batches([x, (x, y), [x, y, "extra"], (x,)]))
    assert [b[1] is None for b in got] == [True, False, False, True]
    assert len(list(labelled_batches(iter([x] * 5), max_batches=2))) == 2
