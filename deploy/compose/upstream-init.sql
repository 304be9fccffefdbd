-- Sample data for the evaluation upstream (docker-compose.yml); runs once, on an empty volume.
CREATE ROLE shop_app LOGIN PASSWORD 'shop-app-example-pw';  -- evaluation only; = SHOP_APP_PASSWORD
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE TABLE orders (
    id int PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers,
    amount numeric(10, 2) NOT NULL,
    status text NOT NULL DEFAULT 'open'
);
INSERT INTO customers SELECT g, 'customer ' || g, 'customer' || g || '@example.com'
    FROM generate_series(1, 100) g;
INSERT INTO orders SELECT g, 1 + g % 100, (g * 7) % 500 + 0.99, CASE WHEN g % 3 = 0 THEN 'paid' ELSE 'open' END
    FROM generate_series(1, 1000) g;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO shop_app;
