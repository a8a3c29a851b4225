"""The columns of the results store: one row per audited image, as a pyarrow schema.

=====================  ============================  ===============================================================
column                 type                          meaning
=====================  ============================  ===============================================================
position               int64                         the image's place in the dataset's fixed order
key                    string                        its path (or id, for images in memory)
label, label_name      int32, string                 the true class: index in the model's labels, short name
predicted, ..._name    int32, string                 the model's top-1 class
correct                bool                          predicted == label
probability            float32                       probability of the predicted class
label_probability      float32                       probability of the true class
top5, top5_probability list<int32>, list<float32>    the five most probable classes
width, height          int32                         the original image's size
has_mask, mask_area    bool, float32                 whether a mask or box was given; the share of the image it covers
map_true, map_pred     fixed_size_list<float32>[s*s] the maps of the true and the predicted class, s x s row-major,
                                                     as the method computed them (sign and scale kept)
true_*, pred_*         float32                       the statistics of each map (:mod:`cnnscope.audit.stats`):
                                                     peak, peak_x, peak_y, inside, on_object, border,
                                                     corner_tl/tr/bl/br, entropy
features               list<float32>                 the penultimate features (input of the last linear layer)
thumbnail              binary                        a small JPEG of the image, for the report's galleries
=====================  ============================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .stats import STAT_NAMES
from .store import require_pyarrow

STAT_COLUMNS = tuple(f"{prefix}_{name}" for prefix in ("true", "pred") for name in STAT_NAMES)


def schema(map_size: int):
    pa, _ = require_pyarrow()
    cells = map_size * map_size
    fields = [
        ("position", pa.int64()),
        ("key", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("predicted", pa.int32()),
        ("predicted_name", pa.string()),
        ("correct", pa.bool_()),
        ("probability", pa.float32()),
        ("label_probability", pa.float32()),
        ("top5", pa.list_(pa.int32())),
        ("top5_probability", pa.list_(pa.float32())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("has_mask", pa.bool_()),
        ("mask_area", pa.float32()),
        ("map_true", pa.list_(pa.float32(), cells)),
        ("map_pred", pa.list_(pa.float32(), cells)),
        *[(name, pa.float32()) for name in STAT_COLUMNS],
        ("features", pa.list_(pa.float32())),
        ("thumbnail", pa.binary()),
    ]
    return pa.schema(fields, metadata={"cnnscope": "audit records", "map_size": str(map_size)})


def _array(pa, values: object, kind):
    if values is None:
        return None  # a column the step could not fill (features of a model without hooks): nulls
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind):
        matrix = np.asarray(values)
        if pa.types.is_fixed_size_list(kind):
            flat = pa.array(matrix.reshape(-1), type=kind.value_type)
            return pa.FixedSizeListArray.from_arrays(flat, kind.list_size)
        width = matrix.shape[1]
        offsets = pa.array(np.arange(0, (matrix.shape[0] + 1) * width, width, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), type=kind.value_type))
    if pa.types.is_floating(kind):
        array = np.asarray(values, dtype=np.float32)
        return pa.array(array, type=kind, from_pandas=True)  # NaN -> null: "no mask", "no evidence"
    return pa.array(values, type=kind)


def to_table(parts: Sequence[dict], map_size: int):
    """One pyarrow Table from the column dicts of :class:`~cnnscope.audit.engine.AuditStep` (an empty
    table with the schema when ``parts`` is empty)."""
    pa, _ = require_pyarrow()
    target = schema(map_size)
    if not parts:
        return target.empty_table()
    tables = []
    for part in parts:
        rows = len(part["position"])
        arrays = []
        for field in target:
            array = _array(pa, part.get(field.name), field.type)
            arrays.append(array if array is not None else pa.nulls(rows, type=field.type))
        tables.append(pa.Table.from_arrays(arrays, schema=target))
    return pa.concat_tables(tables).combine_chunks()
