from conftest import AppCredentials, Server, request_token


def test_api_token_is_issued(server: Server, app: AppCredentials) -> None:
    response = request_token(server, app)
    assert response.status_code == 200
    assert response.json()["token_type"] == "Bearer"
