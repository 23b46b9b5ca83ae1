-- crowd-sync: example HIS query for Oracle (oracle+oracledb:// or oracle+cx_oracle://)
-- crowd-sync 示例 HIS 查询（Oracle）
--
-- 用法 / How to use:
--   把下面从 SELECT 开始到结尾的全部内容粘贴到 settings.yaml 的 `his.query: |` 之下
--   （每行缩进 4 个空格）。结尾的分号可留可去。
--   Paste everything from the SELECT line to the end under `his.query: |` in
--   settings.yaml (indent every line by 4 spaces). The final semicolon is optional.
--
-- 表名、列名只是一个典型 HIS 的样子，请换成本院的 / The table and column names
-- are those of a typical HIS; replace them with your own:
--   JS_JSJL  结算记录 settlements: JSID, JZID, JZLX, ZFY, YBZF, YJJ, QFJE, JSSJ, ZFBZ (0 有效 valid, 1 已作废/反结算 reversed)
--   JZ_JZJL  就诊记录 visits, inpatient and outpatient: JZID, JZLX ('1' 住院 inpatient, '2' 门诊 outpatient),
--            JZH (住院号/门诊号), BRID, RYRQ (入院/就诊日期), CYRQ (出院日期, 门诊为空)
--   BR_JBXX  病人信息 patients: BRID, ZJLX, ZJHM
--   ZD_JL    诊断 diagnoses: ZDID, JZID, ZDBM, ZDMC, ZZD ('1' = 主诊断 main), ZDSJ
--
-- 规则 / Rules:
--   * :since 和 :until 由 crowd-sync 以 DATE/TIMESTAMP 绑定，必须用在有索引的结算时间列上。
--     如果 JSSJ 是字符串列，请改成 DATE 列或函数索引，否则每次轮询都是全表扫描。
--     crowd-sync binds :since and :until as dates; use them on an indexed DATE column.
--     If the settlement time is stored as text, every poll is a full table scan.
--   * changed_at = 结算（含重新结算）时间，决定轮询进度。
--     changed_at is the settlement (or re-settlement) time; it drives polling.
--   * lsh 是"每次就诊"唯一的 ID，不是结算单号：反结算后重新结算要覆盖同一条记录。
--     lsh identifies the visit, not the settlement, so a re-settlement overwrites
--     the same record upstream. Never change how lsh is built once records are sent.
--   * 每次就诊只返回一行：最新一次有效结算。
--     One row per visit: its latest valid settlement.
--   * 日期列直接返回 DATE，不需要 TO_CHAR；列名大写没关系（crowd-sync 不区分大小写）。
--     Return DATE columns as they are (no TO_CHAR); upper-case column names are fine.
--   * Oracle 的表别名前不能写 AS（列别名可以）。
--     Oracle takes no AS before a table alias (column aliases may use AS).
--   * 不要返回多余的列（会报错）。key_crowd 列只在 key_crowd.source: column 时需要。
--     Return no extra columns (that is an error). Add KEY_CROWD only with
--     key_crowd.source: column.
--
-- 必须有的索引 / Indexes this query needs:
--   CREATE INDEX IDX_JS_JSJL_JSSJ ON JS_JSJL (JSSJ);            -- changed_at, the :since/:until window
--   CREATE INDEX IDX_JS_JSJL_JZID ON JS_JSJL (JZID, JSSJ);      -- "latest settlement" check
--   CREATE INDEX IDX_ZD_JL_JZID   ON ZD_JL (JZID, ZZD);         -- main diagnosis
--   JZ_JZJL.JZID, BR_JBXX.BRID: primary keys (usually already indexed)

SELECT
    -- JZID 在住院、门诊之间唯一 / JZID is unique across inpatient and outpatient visits
    TO_CHAR(J.JZID)             AS LSH,
    V.JZH                       AS CODE,
    -- 把本院证件类型代码换成平台的 / map the HIS document types to the platform's
    CASE B.ZJLX WHEN '01' THEN '10' WHEN '02' THEN '30' WHEN '06' THEN '43'
                WHEN '05' THEN '44' WHEN '03' THEN '50' ELSE '60' END AS CARD_TYPE,
    B.ZJHM                      AS CARD_NO,
    J.JZLX                      AS VISIT_TYPE,
    V.RYRQ                      AS ENTER_DATE,
    CASE J.JZLX WHEN '1' THEN V.CYRQ END AS LEAVE_DATE,
    -- 主诊断：有多条时取最早的一条 / the main diagnosis; the earliest when there are several
    (SELECT MIN(Z.ZDMC) KEEP (DENSE_RANK FIRST ORDER BY Z.ZDSJ, Z.ZDID)
       FROM ZD_JL Z WHERE Z.JZID = J.JZID AND Z.ZZD = '1') AS ICD_NAME,
    (SELECT MIN(Z.ZDBM) KEEP (DENSE_RANK FIRST ORDER BY Z.ZDSJ, Z.ZDID)
       FROM ZD_JL Z WHERE Z.JZID = J.JZID AND Z.ZZD = '1') AS ICD_CODE,
    NVL(J.ZFY, 0)               AS TOTAL_FEE,
    NVL(J.YBZF, 0)              AS INS_FEE,
    -- 门诊没有住院预交金 / no deposit for outpatients
    CASE J.JZLX WHEN '1' THEN NVL(J.YJJ, 0) ELSE 0 END AS TOTAL_PREPAYMENT,
    NVL(J.QFJE, 0)              AS DEFICIENT_FEE,
    J.JSSJ                      AS SETTLEMENT_DATE,
    J.JSSJ                      AS CHANGED_AT
FROM JS_JSJL J
JOIN JZ_JZJL V ON V.JZID = J.JZID
JOIN BR_JBXX B ON B.BRID = V.BRID
WHERE J.ZFBZ = '0'
  AND J.JZLX IN ('1', '2')
  AND J.JSSJ >= :since AND J.JSSJ < :until
  AND NOT EXISTS (SELECT 1 FROM JS_JSJL L
                   WHERE L.JZID = J.JZID AND L.ZFBZ = '0' AND L.JSSJ > J.JSSJ);
