-- A "legacy" database with a card-transactions table for the compose stack's example source.
CREATE DATABASE legacy OWNER gateway;
\connect legacy
CREATE TABLE card_transactions (
  txn_id            integer PRIMARY KEY,
  account_no        varchar(12) NOT NULL,
  amount            numeric(12,2) NOT NULL,
  currency          char(3) NOT NULL,
  merchant_category char(4) NOT NULL,
  country           char(2) NOT NULL,
  channel           varchar(8) NOT NULL,
  status            varchar(10) NOT NULL,
  last_modified     timestamp(6) NOT NULL
);
CREATE INDEX card_transactions_cursor ON card_transactions (last_modified, txn_id);
ALTER TABLE card_transactions OWNER TO gateway;
INSERT INTO card_transactions
SELECT g, 'AC' || lpad((g % 400)::text, 6, '0'),
       round((exp(3.3 + 0.6 * (random() * 2 - 1)) * CASE WHEN random() < 0.02 THEN 40 ELSE 1 END)::numeric, 2),
       'EUR', (ARRAY['5411','5812','5541','5999'])[1 + g % 4],
       CASE WHEN random() < 0.01 THEN 'KP' ELSE 'DE' END,
       (ARRAY['pos','ecom','atm'])[1 + g % 3], 'BOOKED',
       now() - make_interval(secs => 5000 - g)
FROM generate_series(1, 5000) AS g;
