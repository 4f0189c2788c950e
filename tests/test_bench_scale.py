"""bench/scale.py's capacity arithmetic on given costs (no servers, no timing)."""

from __future__ import annotations

import dataclasses
import math

from bench.scale import PG_MAX_CONNECTIONS, PG_RESERVED, POOL_PER_PROCESS, Costs, Profile, first_bottleneck, plan

COSTS = Costs(receiver_mb_s=50.0, cpu_clips_s=0.1, gpu_clips_s=1.0, gpu_basis="given",
              sql_bytes_per_study=100e3, sql_rows_per_study=30, sql_bytes_per_instance=1e3, sql_rows_per_instance=3,
              bench_instances_per_study=3, result_bytes_per_study=10e6, result_objects_per_study=6,
              puts_per_instance=1, gets_per_clip=1, gets_per_result=1, redis_messages_per_study=2,
              redis_commands_per_study=20, pg_conn_serve=3, pg_conn_worker=2, delivery_s_per_study=1.0)


def test_one_hospital():
    got = plan(Profile(), COSTS)          # 2,000 studies a day, 15 % in the peak hour, 80 × 5 MB, 3 A4C
    assert got["peak_studies_per_hour"] == 300
    assert got["peak_ingest_mb_s"] == 33.3                     # 300/3600 × 400 MB
    assert got["receivers"] == 1 and got["receiver_limit"] == "receiver CPU"
    assert got["receivers_if_all_carts_send_at_once"] == 4     # 50 carts / 16 associations
    assert got["cpu_workers"] == 3 and got["gpu_workers"] == 1  # 0.25 clips/s
    assert got["delivery_workers"] == 1
    assert got["objects_tb_per_day"] == 0.82                   # 2,000 × (400 MB + 10 MB)
    assert got["objects_tb_per_year"] == 299.3
    # the bench's 3-instance study + 77 more instances at the receive-side cost
    assert got["sql_gb_per_day"] == round(2000 * (100e3 + 77e3) / 1e9, 3)
    assert got["sql_rows_per_s_peak"] == round(300 / 3600 * (30 + 77 * 3), 1)
    assert got["pg_connections_ceiling_gpu"] == 3 * POOL_PER_PROCESS   # receiver, GPU and delivery worker
    assert got["pg_connections_ceiling_cpu"] == 5 * POOL_PER_PROCESS
    assert got["pg_connections_seen_gpu"] == 1 * 3 + 2 * 2
    assert got["s3_put_per_s"] == round(300 / 3600 * (80 + 6), 1)
    assert got["s3_get_per_s"] == round(300 / 3600 * (3 + 6), 1)
    assert got["redis_messages_per_s"] == round(300 / 3600 * 2, 2)


def test_a_hundred_hospitals_and_the_network_limit():
    region = Profile().times(100)
    got = plan(region, COSTS)
    assert got["peak_ingest_mb_s"] == 3333.3
    assert got["receivers"] == math.ceil(3333.33 / 50)
    assert got["gpu_workers"] == 25 and got["cpu_workers"] == 250
    fast = dataclasses.replace(COSTS, receiver_mb_s=500.0)      # a receiver faster than its 1 GbE link
    got = plan(region, fast, nic="1GbE")
    assert got["receiver_limit"] == "network" and got["receivers"] == math.ceil(3333.33 / 117)


def test_first_bottleneck_is_where_a_shared_limit_is_first_passed():
    order = first_bottleneck(Profile(), COSTS)
    usable = PG_MAX_CONNECTIONS - PG_RESERVED
    first = order[0]
    assert first["part"].startswith("PostgreSQL connections (pool ceiling")
    k = first["at_x_load"]
    assert plan(Profile().times(k), COSTS)["pg_connections_ceiling_gpu"] > usable
    assert plan(Profile().times(k / 1.06), COSTS)["pg_connections_ceiling_gpu"] <= usable
    found = [r["at_x_load"] for r in order if r["at_x_load"] is not None]
    assert found == sorted(found)
    s3_put = next(r for r in order if r["part"] == "S3 PUT/s per prefix")
    # 3,500 PUT/s at 86 PUTs a study: 40.7 studies/s, ×488 of 300 studies an hour (steps of 5 %)
    assert 488 <= s3_put["at_x_load"] < 488 * 1.05
