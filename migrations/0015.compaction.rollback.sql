-- Unfold every compacted conversation back into chunk rows, then drop the compact form.
CREATE FUNCTION pg_temp.unfold_layout(layout bytea, response text, created timestamptz)
RETURNS TABLE (seq integer, text text, created_at timestamptz) LANGUAGE plpgsql AS $$
DECLARE
    position integer := 1;  -- get_byte counts from 0: byte 0 is the version
    start_char integer := 1;
    ms bigint := 0;
    length integer;
    delta bigint;
    shift integer;
    byte integer;
    n integer := 0;
BEGIN
    IF get_byte(layout, 0) <> 1 THEN RETURN; END IF;
    WHILE position < octet_length(layout) LOOP
        length := 0; shift := 0;
        LOOP
            byte := get_byte(layout, position); position := position + 1;
            length := length | ((byte & 127) << shift); shift := shift + 7;
            EXIT WHEN byte < 128;
        END LOOP;
        delta := 0; shift := 0;
        LOOP
            byte := get_byte(layout, position); position := position + 1;
            delta := delta | ((byte & 127)::bigint << shift); shift := shift + 7;
            EXIT WHEN byte < 128;
        END LOOP;
        ms := ms + CASE WHEN delta & 1 = 0 THEN delta >> 1 ELSE -((delta + 1) >> 1) END;
        n := n + 1;
        seq := n;
        text := substr(response, start_char, length);
        created_at := created + make_interval(secs => ms / 1000.0);
        start_char := start_char + length;
        RETURN NEXT;
    END LOOP;
END
$$;

INSERT INTO chunks (conversation_id, seq, text, created_at)
SELECT c.id, u.seq, u.text, u.created_at
FROM chunk_layouts l JOIN conversations c ON c.id = l.conversation_id
CROSS JOIN LATERAL pg_temp.unfold_layout(l.layout, c.response, c.created_at) AS u
ON CONFLICT DO NOTHING;

DROP TABLE chunk_layouts;

