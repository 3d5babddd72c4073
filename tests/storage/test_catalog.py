"""The DuckDB catalog over artifacts written by older code: a column added to a table's schema later reads
as NULL in the older artifacts' rows (instead of failing every query on the home)."""

import pyarrow as pa
import pyarrow.parquet as pq

from storage.catalog import query
from storage.schemas import OPD_LOSSES
from storage.store import ArtifactStore
from tasks.artifacts import build_artifact


def test_a_column_added_to_the_schema_later_reads_as_null_in_older_artifacts(tmp_path):
    older = pa.schema([field for field in OPD_LOSSES if field.name != "baseline"])
    row = {"iteration": 1, "step": 1, "loss": 0.5, "kl": 0.25, "tokens": 10, "clipped": 0, "episodes": 2,
           "step_time_s": 1.0}

    def write(schema, baseline):
        def written(artifact):
            values = row | ({"baseline": baseline} if "baseline" in schema.names else {})
            pq.write_table(pa.Table.from_pylist([values], schema=schema), artifact.path / "opd_losses.parquet")
            return {"opd_losses": 1}, {}
        return written

    store = ArtifactStore(tmp_path)
    old = build_artifact(store.plan_stage("opd", {"run": "old"}, code="catalog-test"), write(older, None), "")
    new = build_artifact(store.plan_stage("opd", {"run": "new"}, code="catalog-test"), write(OPD_LOSSES, -0.3), "")
    columns, rows = query(tmp_path, "select artifact_id, step, kl, baseline from opd_losses order by baseline nulls first")
    assert columns == ["artifact_id", "step", "kl", "baseline"]
    assert rows == [(old.id, 1, 0.25, None), (new.id, 1, 0.25, -0.3)]
    assert query(tmp_path, "select typeof(baseline) from opd_losses limit 1")[1] == [("DOUBLE",)]
    # only the older artifact: the view still has the column
    new.path.joinpath("manifest.json").unlink()
    assert query(tmp_path, "select baseline from opd_losses")[1] == [(None,)]
