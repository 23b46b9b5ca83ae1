-- crowd-sync: example HIS query for MySQL / MariaDB
-- crowd-sync 示例 HIS 查询（MySQL / MariaDB）
--
-- 用法 / How to use:
--   把下面从 SELECT 开始到结尾的全部内容粘贴到 settings.yaml 的 `his.query: |` 之下
--   （每行缩进 4 个空格）。结尾的分号可留可去。
--   Paste everything from the SELECT line to the end under `his.query: |` in
--   settings.yaml (indent every line by 4 spaces). The final semicolon is optional.
--
-- 表名、列名只是一个典型 HIS 的样子，请换成本院的 / The table and column names
-- are those of a typical HIS; replace them with your own:
--   js       结算记录 settlements, inpatient and outpatient (jzlx = '1' / '2')
--            jsid, jzid, jzlx, brid, zfy, ybzf, yjj, qfje, jssj, zfbz (0 有效 valid, 1 已作废/反结算 reversed)
--   zy_brry  住院登记 inpatient admissions: zyid, zyh, brid, ryrq, cyrq
--   mz_ghjl  门诊挂号 outpatient visits: mzid, mzh, brid, jzrq
--   br_jbxx  病人信息 patients: brid, zjlx, zjhm
--   zd_jl    诊断 diagnoses: jzid, jzlx, zdbm, zdmc, zzd (1 = 主诊断 main), zdsj
--
-- 规则 / Rules:
--   * :since 和 :until 由 crowd-sync 填入，必须用在有索引的结算时间列上。
--     crowd-sync fills in :since and :until; use them on an indexed column.
--   * changed_at = 结算（含重新结算）时间，决定轮询进度。
--     changed_at is the settlement (or re-settlement) time; it drives polling.
--   * lsh 是"每次就诊"唯一的 ID，不是结算单号：反结算后重新结算要覆盖同一条记录。
--     住院、门诊的 ID 可能重复，所以加前缀 ZY / MZ。上线后不要再改 lsh 的取法。
--     lsh identifies the visit, not the settlement, so a re-settlement overwrites
--     the same record upstream. Inpatient and outpatient IDs may collide, hence
--     the ZY / MZ prefixes. Never change how lsh is built once records are sent.
--   * 每次就诊只返回一行：最新一次有效结算。
--     One row per visit: its latest valid settlement.
--   * 日期、时间列直接返回 DATE/DATETIME，格式由 crowd-sync 处理。
--     Return DATE/DATETIME columns as they are; crowd-sync formats them.
--   * 不要返回多余的列（会报错）。key_crowd 列只在 key_crowd.source: column 时需要。
--     Return no extra columns (that is an error). Add key_crowd only with
--     key_crowd.source: column.
--
-- 必须有的索引 / Indexes this query needs:
--   CREATE INDEX idx_js_jssj    ON js (jssj);              -- changed_at, the :since/:until window
--   CREATE INDEX idx_js_jzid    ON js (jzid, jzlx, jssj);   -- "latest settlement" check
--   CREATE INDEX idx_zd_jl_jzid ON zd_jl (jzid, jzlx, zzd); -- main diagnosis
--   zy_brry.zyid, mz_ghjl.mzid, br_jbxx.brid: primary keys (usually already indexed)

SELECT
    CONCAT('ZY', zy.zyid)       AS lsh,
    zy.zyh                      AS code,
    -- 把本院证件类型代码换成平台的 / map the HIS document types to the platform's
    CASE br.zjlx WHEN '01' THEN '10' WHEN '02' THEN '30' WHEN '06' THEN '43'
                 WHEN '05' THEN '44' WHEN '03' THEN '50' ELSE '60' END AS card_type,
    br.zjhm                     AS card_no,
    '1'                         AS visit_type,
    zy.ryrq                     AS enter_date,
    zy.cyrq                     AS leave_date,
    (SELECT z.zdmc FROM zd_jl z
      WHERE z.jzid = js.jzid AND z.jzlx = js.jzlx AND z.zzd = '1'
      ORDER BY z.zdsj, z.zdbm LIMIT 1) AS icd_name,
    (SELECT z.zdbm FROM zd_jl z
      WHERE z.jzid = js.jzid AND z.jzlx = js.jzlx AND z.zzd = '1'
      ORDER BY z.zdsj, z.zdbm LIMIT 1) AS icd_code,
    COALESCE(js.zfy, 0)         AS total_fee,
    COALESCE(js.ybzf, 0)        AS ins_fee,
    COALESCE(js.yjj, 0)         AS total_prepayment,
    COALESCE(js.qfje, 0)        AS deficient_fee,
    js.jssj                     AS settlement_date,
    js.jssj                     AS changed_at
FROM js
JOIN zy_brry zy ON zy.zyid = js.jzid
JOIN br_jbxx br ON br.brid = zy.brid
WHERE js.jzlx = '1'
  AND js.zfbz = '0'
  AND js.jssj >= :since AND js.jssj < :until
  AND NOT EXISTS (SELECT 1 FROM js later
                   WHERE later.jzid = js.jzid AND later.jzlx = js.jzlx
                     AND later.zfbz = '0' AND later.jssj > js.jssj)

UNION ALL

SELECT
    CONCAT('MZ', mz.mzid)       AS lsh,
    mz.mzh                      AS code,
    CASE br.zjlx WHEN '01' THEN '10' WHEN '02' THEN '30' WHEN '06' THEN '43'
                 WHEN '05' THEN '44' WHEN '03' THEN '50' ELSE '60' END AS card_type,
    br.zjhm                     AS card_no,
    '2'                         AS visit_type,
    mz.jzrq                     AS enter_date,
    NULL                        AS leave_date,
    (SELECT z.zdmc FROM zd_jl z
      WHERE z.jzid = js.jzid AND z.jzlx = js.jzlx AND z.zzd = '1'
      ORDER BY z.zdsj, z.zdbm LIMIT 1) AS icd_name,
    (SELECT z.zdbm FROM zd_jl z
      WHERE z.jzid = js.jzid AND z.jzlx = js.jzlx AND z.zzd = '1'
      ORDER BY z.zdsj, z.zdbm LIMIT 1) AS icd_code,
    COALESCE(js.zfy, 0)         AS total_fee,
    COALESCE(js.ybzf, 0)        AS ins_fee,
    0                           AS total_prepayment,   -- 门诊没有住院预交金 / no deposit for outpatients
    COALESCE(js.qfje, 0)        AS deficient_fee,
    js.jssj                     AS settlement_date,
    js.jssj                     AS changed_at
FROM js
JOIN mz_ghjl mz ON mz.mzid = js.jzid
JOIN br_jbxx br ON br.brid = mz.brid
WHERE js.jzlx = '2'
  AND js.zfbz = '0'
  AND js.jssj >= :since AND js.jssj < :until
  AND NOT EXISTS (SELECT 1 FROM js later
                   WHERE later.jzid = js.jzid AND later.jzlx = js.jzlx
                     AND later.zfbz = '0' AND later.jssj > js.jssj);
